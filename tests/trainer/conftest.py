"""Shared fixtures of the trainer tests. Nothing here downloads anything (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support.workspace import VIGGO_SPECIAL_TOKENS, build_tiny_tokenizer  # after HF_HUB_OFFLINE
from viggo_like import viggo_like_rows

# ---------------------------------------------------------------- tokenizers and data (test_data.py)


@pytest.fixture(scope="session")
def viggo_corpus() -> list[dict[str, str]]:
    """Synthetic ViGGO-style rows {"ref", "mr"} (the `make demo` data)."""
    return viggo_like_rows(300, seed=0)


@pytest.fixture
def tiny_tokenizer(viggo_corpus: list[dict[str, str]]) -> Any:
    """A fresh byte-level BPE tokenizer (BOS <s>, EOS </s>, <pad>) trained on the corpus; the ViGGO
    template's special tokens are NOT in it yet (a base model's tokenizer has never seen them)."""
    return build_tiny_tokenizer([f"{r['ref']} {r['mr']}" for r in viggo_corpus], VIGGO_SPECIAL_TOKENS)


@pytest.fixture
def viggo_tokenizer(tiny_tokenizer: Any) -> Any:
    """`tiny_tokenizer` with the ViGGO template's special tokens added, as the trainer adds them
    (kubetune.trainer.model.add_special_tokens_to_tokenizer). transformers 5 calls them
    `extra_special_tokens`; replace_extra_special_tokens=False keeps existing ones special."""
    tiny_tokenizer.add_special_tokens({"extra_special_tokens": VIGGO_SPECIAL_TOKENS},
                                      replace_extra_special_tokens=False)
    return tiny_tokenizer
