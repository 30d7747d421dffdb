"""The examples read what `kubetune data prepare` writes: for each task, the command in the example's README,
run on the real public files, produces every data file the example's manifests name under its `--to`, and
every row of them fills every template and reference those manifests apply to it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main
from kubetune.contract.templates import fill_templates
from kubetune.trainer.data import read_rows
from support import shared

REPO = Path(__file__).resolve().parents[2]
SOURCES = {"viggo": "viggo", "gsm8k": "gsm8k", "sql": "spider"}


def readme_command(task: str) -> list[str]:
    """The one `kubetune data prepare <task> ...` command of examples/<task>/README.md, as arguments."""
    text = (REPO / "examples" / task / "README.md").read_text()
    commands = re.findall(rf"^kubetune data prepare {task} .*$", text, flags=re.MULTILINE)
    assert len(commands) == 1, f"examples/{task}/README.md: expected one `kubetune data prepare {task}` command"
    return shlex.split(commands[0].split("#")[0])[1:]


def data_uses(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, str] | None, list[str]]]:
    """(uri, format, columns, templates applied to its rows) for every data file a manifest reads."""
    spec = doc["spec"]
    uses = []
    if doc["kind"] == "FineTuneJob":
        template = spec["dataset"].get("template") or {}
        texts = [t for t in (template.get("prompt"), template.get("completion")) if t]
        for split in ("train", "validation"):
            source = spec["dataset"].get(split)
            if source:
                uses.append((source["uri"], source.get("format", "jsonl"), source.get("columns"), texts))
    else:
        ds = spec["dataset"]
        prompts = [c["prompt"] for c in spec["candidates"] if c.get("prompt")]
        uses.append((ds["uri"], ds.get("format", "jsonl"), ds.get("columns"),
                     [ds["reference"], *(p["template"] for p in prompts)]))
        for p in prompts:
            source = (p.get("fewShot") or {}).get("source")
            if source:
                uses.append((source["uri"], source.get("format", "jsonl"), source.get("columns"),
                             [p["template"], p.get("answer") or ds["reference"]]))
    return uses


@pytest.mark.parametrize("task", sorted(SOURCES))
def test_the_readme_command_makes_the_data_the_example_reads(task: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = shared.require(shared.DATASETS / SOURCES[task], f"the real {task} files")
    args = readme_command(task)
    to = args[args.index("--to") + 1]
    args[args.index("--source") + 1] = str(source)
    args[args.index("--to") + 1] = str(tmp_path)
    assert main(args) == 0, capsys.readouterr().err
    docs = [d for f in sorted((REPO / "examples" / task).glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    used = [u for d in docs for u in data_uses(d) if u[0].startswith(to.rstrip("/") + "/")]
    assert {u[0] for u in used} >= {f"{to}/train.jsonl", f"{to}/test.jsonl"}
    for uri, fmt, columns, templates in used:
        rows = read_rows(tmp_path / uri.removeprefix(to.rstrip("/") + "/"), fmt, columns)
        for row in rows:
            fill_templates(templates, row.fields)  # MissingFields names what a row lacks
