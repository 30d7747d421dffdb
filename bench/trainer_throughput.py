"""Trainer throughput: kubetune's data path and loop vs a naive Hugging Face loop, in one run.

Same model, same data, same optimizer, same number of examples, one process:
  baseline  — a naive Hugging Face loop: shuffled examples, each batch padded to its longest example
              (per-batch padding, what `DataCollatorWithPadding` does), every token computed;
  kubetune  — length-grouped batches (kubetune.trainer.data: group-by-length, right-padded per batch) and
              the same forward/backward/step.
Reported: tokens/s of real (non-padding) tokens and the padding waste of each. Targets: ratio >= 1.5x,
kubetune's padding waste <= 3%.

    .venv/bin/python bench/trainer_throughput.py                # CPU: tiny Llama, ViGGO-style data
    .venv/bin/python bench/trainer_throughput.py --gpu          # a ~1B Llama, bf16, DeepSpeed, one GPU: MFU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from kubetune.trainer.data import Example, collate, length_grouped_batches, padding_waste, tokenize
from kubetune.trainer.model import add_special_tokens_to_tokenizer
from support.workspace import VIGGO_SPECIAL_TOKENS, build_tiny_tokenizer, tiny_llama
from viggo_like import viggo_like_rows


def examples(n: int, max_length: int) -> tuple[Any, list[Example]]:
    rows = viggo_like_rows(n, seed=3)
    tokenizer = build_tiny_tokenizer([f"{r['ref']} {r['mr']}" for r in rows], VIGGO_SPECIAL_TOKENS, vocab_size=1000)
    add_special_tokens_to_tokenizer(tokenizer, VIGGO_SPECIAL_TOKENS)
    out = [tokenize(f"<START_Q>{r['ref']}<END_Q>", f"<START_A>{r['mr']}", tokenizer, max_length, "all", "<END_A>")
           for r in rows]
    return tokenizer, out


def train_steps(model: Any, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def naive_batches(data: list[Example], batch_size: int, pad_id: int) -> list[list[int]]:
    """Shuffled order, consecutive batches (each then padded to its own longest example)."""
    order = list(range(len(data)))
    random.Random(0).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer, data = examples(args.rows, args.max_length)
    pad = tokenizer.pad_token_id
    lengths = [len(e.input_ids) for e in data]
    real_tokens = sum(lengths)
    grouped_idx = length_grouped_batches(lengths, args.batch_size, seed=0, epoch=0)
    grouped = [collate([data[i] for i in b], pad) for b in grouped_idx]
    naive_idx = naive_batches(data, args.batch_size, pad)
    naive = [collate([data[i] for i in b], pad) for b in naive_idx]
    naive_waste = padding_waste(naive_idx, lengths)
    kubetune_waste = padding_waste(grouped_idx, lengths)
    results: dict[str, Any] = {"rows": args.rows, "real_tokens": real_tokens, "batch_size": args.batch_size,
                               "max_length": args.max_length}
    device = torch.device("cpu")
    timings: dict[str, list[float]] = {"baseline": [], "kubetune": []}
    for repeat in range(args.repeats):  # interleaved, so both see the same machine state
        for name, batches in (("baseline", naive), ("kubetune", grouped)):
            model = tiny_llama(len(tokenizer), hidden=args.hidden, layers=args.layers, heads=4, seed=repeat)
            timings[name].append(train_steps(model, batches, device))
    for name, seconds in timings.items():
        best = min(seconds)
        results[name] = {"seconds": best, "tokens_per_second": real_tokens / best}
    results["baseline"]["padding_waste"] = naive_waste
    results["kubetune"]["padding_waste"] = kubetune_waste
    results["ratio"] = results["kubetune"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    return results


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    """A ~1B-parameter random Llama, bf16, DeepSpeed ZeRO-2 on one GPU: model FLOPs utilisation."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    ds = {"train_micro_batch_size_per_gpu": args.gpu_batch, "gradient_accumulation_steps": 1,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    seq = args.gpu_seq
    ids = torch.randint(0, 32000, (args.gpu_batch, seq), device=engine.device)
    for _ in range(3):  # warm-up
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps, start = args.gpu_steps, time.perf_counter()
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = steps * args.gpu_batch * seq
    # 6 N per token for the matmuls plus the attention term 12 * layers * hidden * seq (PaLM appendix B)
    flops = tokens * (6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq)
    peak = float(os.environ.get("KUBETUNE_PEAK_TFLOPS", "989")) * 1e12  # H100 SXM dense bf16
    return {"params": params, "tokens_per_second": tokens / seconds, "mfu": flops / seconds / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-seq", type=int, default=2048)
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("bench/results/trainer_throughput.json"))
    args = parser.parse_args(argv)
    if args.gpu:
        r = gpu(args)
        print(f"GPU ({r['device']}): {r['params'] / 1e9:.2f}B params, {r['tokens_per_second']:.0f} tokens/s, "
              f"MFU {r['mfu']:.1%} (target >= 45%), peak memory {r['peak_memory_gib']:.1f} GiB")
    else:
        r = cpu(args)
        b, k = r["baseline"], r["kubetune"]
        print(f"{r['rows']} rows, {r['real_tokens']} real tokens, batch {r['batch_size']}, max_length {r['max_length']}")
        print(f"  baseline (shuffled, per-batch padding):       {b['tokens_per_second']:8.0f} tokens/s, "
              f"padding waste {b['padding_waste']:.1%}")
        print(f"  kubetune (length-grouped, per-batch padding): {k['tokens_per_second']:8.0f} tokens/s, "
              f"padding waste {k['padding_waste']:.1%}")
        print(f"  {'PASS' if r['ratio'] >= 1.5 else 'MISS'}  tokens/s ratio {r['ratio']:.2f}x (target >= 1.5x)")
        print(f"  {'PASS' if k['padding_waste'] <= 0.03 else 'MISS'}  padding waste {k['padding_waste']:.2%} "
              "(target <= 3%)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
