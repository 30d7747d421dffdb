"""`kubetune data prepare TASK --source DIR --to URI`: the examples' data, converted, split and uploaded.

The conversion is `kubetune.contract.prepare`'s; the files are written to a temporary folder first and
uploaded with `kubetune.contract.storage.upload_files` (manifest.json last), so a refused row leaves
nothing at `--to` and an existing file there is never half-replaced.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kubetune.cli.errors import CliError, Exit
from kubetune.contract import prepare as prep
from kubetune.contract.storage import StorageError, TargetExists, upload_files


def prepare_and_upload(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp:
        try:
            prepared = prep.prepare(args.task, Path(args.source), Path(tmp), seed=args.seed,
                                    valid_share=args.valid_share, test_share=args.test_share)
        except prep.SourceMissing as exc:
            raise CliError(Exit.USAGE, f"--source: {exc}") from None
        except prep.SourceError as exc:
            raise CliError(Exit.DATA, str(exc)) from None
        except ValueError as exc:  # the shares
            raise CliError(Exit.USAGE, str(exc)) from None
        splits = [s for s in prep.SPLITS if s in prepared.files]
        files = [prepared.files[s] for s in splits] + [prepared.files["manifest"]]
        try:
            uris = upload_files(files, args.to, overwrite=args.overwrite)
        except TargetExists as exc:
            raise CliError(Exit.USAGE, f"--to {exc}") from None
        except StorageError as exc:
            raise CliError(Exit.UNAVAILABLE, f"--to {exc}") from None
    for split, uri in zip(splits, uris, strict=False):
        groups = prepared.groups.get(split)
        print(f"{split:<5}  {prepared.rows[split]:>7} rows" + (f"  {groups:>6} groups" if groups else " " * 15)
              + f"  {uri}")
    print(f"manifest          {' ' * 15}  {uris[-1]}")
    return Exit.OK
