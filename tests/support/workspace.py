"""Test support for the trainer: a tiny tokenizer trained on the spot, a tiny Llama, a workspace.

`build_tiny_tokenizer` stands in for a pretrained model's tokenizer without any download. The ViGGO-like
rows come from scripts/viggo_like.py (re-exported here).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import PromptTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# A minimal chat template (role markers as plain text, BOS written by the template, as Llama 3's does).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The template of the ViGGO case study: sentence (ref) in, meaning representation (mr) out.
VIGGO_SPECIAL_TOKENS = ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"]


def viggo_template() -> PromptTemplate:
    return PromptTemplate(special_tokens=list(VIGGO_SPECIAL_TOKENS), prompt="<START_Q>{ref}<END_Q>",
                          completion="<START_A>{mr}", stop="<END_A>")


def build_tiny_tokenizer(texts: Iterable[str], special_tokens: Sequence[str] = (),
                         vocab_size: int = 400) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    Like a pretrained (Llama-style) tokenizer: `<s>` BOS prepended to every encoded text, `</s>` EOS,
    `<pad>`, `<unk>`, a chat template. `special_tokens` are cut out of the texts before training and NOT
    added, as a base model has never seen a template's tokens: the trainer adds them (the real code path).
    Training takes milliseconds for a few hundred short texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def clean(text: str) -> str:
        for token in special_tokens:
            text = text.replace(token, " ")
        return text

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator((clean(t) for t in texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    # transformers 5: PreTrainedTokenizerFast is an alias of TokenizersBackend (untyped __init__).
    tokenizer: PreTrainedTokenizerBase = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=TINY_CHAT_TEMPLATE, model_max_length=4096)
    return tokenizer


# ------------------------------------------------------------------------------------------ tiny model

if TYPE_CHECKING:
    from typing import Any

    from transformers import LlamaForCausalLM


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               tie_word_embeddings: bool = True, **config: Any) -> LlamaForCausalLM:
    """A tiny random LlamaForCausalLM (hidden 64, 2 layers: ~0.1M parameters with a few hundred tokens),
    the same initial weights for the same arguments; the global RNG is left untouched.

    `config` overrides LlamaConfig fields (bos_token_id, eos_token_id, pad_token_id, ...).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    model.train(False)  # as from_pretrained returns a model (no dropout in Llama anyway)
    return model


def write_workspace(root: Path, rows: list[dict[str, str]], n_train: int) -> Path:
    """A tiny base model in root/base (random Llama + BPE tokenizer trained on `rows`, without the ViGGO
    special tokens, as a real base model) and root/train.jsonl, root/valid.jsonl split at `n_train`."""
    tokenizer = build_tiny_tokenizer([f"{r['ref']} {r['mr']}" for r in rows], VIGGO_SPECIAL_TOKENS)
    tiny_llama(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for name, part in (("train", rows[:n_train]), ("valid", rows[n_train:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root
