"""Where the base model comes from, and getting it (and its tokenizer) into memory.

- `load_tokenizer` / `load_model` load a Hugging Face id or a Hugging Face checkpoint directory (local, or
  fetched from a pvc:// / s3:// ... URI). GGUF files are not loaded here: the source repository's dev and
  demo tooling (`smollm2.py`) converts one into an ordinary checkpoint directory first.
- `add_special_tokens` adds a prompt format's special tokens and grows the embeddings to match.

No kopf and no ray here: this runs in the Ray workers and in plain scripts alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kubetune.contract.storage import resolve_uri

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ model sources

@dataclass(frozen=True)
class ModelSource:
    """A base model: a Hugging Face id (`name`, `revision`) or a local checkpoint directory (`path`)."""

    name: str | None = None
    revision: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.path is None):
            raise ValueError("ModelSource: set exactly one of name, path")

    @classmethod
    def resolve(cls, *, name: str | None = None, revision: str | None = None, uri: str | None = None,
                cache_dir: Path) -> ModelSource:
        """From the API's fields (a BaseModelSource): a uri is resolved to a local path."""
        if (name is None) == (uri is None):
            raise ValueError("set exactly one of name, uri (resolve fineTuneJobRef to a uri first)")
        if uri is not None:
            return cls(path=resolve_uri(uri, cache_dir))
        return cls(name=name, revision=revision)

    def describe(self) -> str:
        return self.name + (f"@{self.revision}" if self.revision else "") if self.name else str(self.path)


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _pretrained_location(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """What to pass to `from_pretrained` (a local directory or a hub id)."""
    if source.path is not None:
        if source.path.suffix == ".gguf":
            raise ValueError(f"{source.path}: GGUF files are not loaded by kubetune; convert it into a Hugging "
                             "Face checkpoint directory first (as smollm2.py in kubetune's source repository does)")
        return str(source.path), {}
    assert source.name is not None
    return source.name, {"revision": source.revision, "token": _hf_token()}


def load_tokenizer(source: ModelSource, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of `source`."""
    from transformers import AutoTokenizer

    where, kwargs = _pretrained_location(source)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(where, **kwargs)
    return tokenizer


def load_model(source: ModelSource, cache_dir: Path, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """The causal LM of `source`, in `dtype` (None: as stored)."""
    from transformers import AutoModelForCausalLM

    where, kwargs = _pretrained_location(source)
    started = time.monotonic()
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    log.info("loaded %s (%s) in %.1fs", source.describe(), where, time.monotonic() - started)
    return model


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
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with gathered, torch.no_grad():
        mean = weight[:real].float().mean(dim=0)
        weight[ids] = mean.to(weight.dtype)
