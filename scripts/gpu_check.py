"""`make gpu-check`: the trainer's own code on one GPU, on a host without Ray, DeepSpeed or a network.

Made for the GPU host lent to checks (torch + CUDA, transformers, accelerate; no Ray, DeepSpeed or vLLM; no
network; at most 64 MiB carried per call): `make gpu-check-bundle` (here) prepares `gpu-check/` (this
script, the kubetune source it needs, the wheels the host lacks, ViGGO, SmolLM2's tokenizer and the first
part of its GGUF weights) and `gpu-check-model/` (the rest of the weights); on the GPU host

    python gpu-check/gpu_check.py OUT_DIR          # <= 8 minutes; writes OUT_DIR/gpu_check.json

installs what is missing from the bundle's wheels into `gpu-check/site` (nothing outside the bundle) and runs

  gemm   the GPU's bf16 matrix-product rate (the yardstick of MFU);
  step   the trainer's own step: a ~1B Llama built from a config, saved and loaded back with the template's
         special tokens (kubetune.trainer.engine.load_for_training), length-grouped batches of tokenized
         ViGGO rows (kubetune.trainer.data: preflight, stream_batches, collate), DeepSpeed ZeRO-2 and ZeRO-3
         in bf16 (kubetune.trainer.deepspeed_config, engine.initialize): tokens/s, MFU against `gemm`, peak
         GPU memory; then the streamed consolidated checkpoint (kubetune.trainer.consolidate) of each, its
         host and GPU memory against its largest shard;
  viggo  SmolLM2-135M (converted from its GGUF by smollm2.py) fine-tuned on all of ViGGO for 3 epochs in bf16
         with the same pieces, then greedy decoding of the held-out rows with batched `generate` (the
         fine-tuned model's own prompt format, as an EvalJob builds it) scored by the `viggo` scorer.

Output is unbuffered; every phase's failure is recorded in the JSON and the next phase still runs.
`--dry-run` does all of it on the CPU in about a minute (a tiny model, a few steps, fp32 as DeepSpeed's CPU
accelerator trains) from the source tree: `make test` runs it that way.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VIGGO_SPECIAL_TOKENS = ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"]
# A ~1.1B Llama (TinyLlama's shape); vocab_size comes from the tokenizer.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}
LLAMA_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}
# Distributions the kubetune code and DeepSpeed need, and the oldest acceptable version on the host.
NEEDED = {"deepspeed": "0.19", "pydantic": "2.0", "pydantic-core": "2.0", "annotated-types": "0.6",
          "typing-inspection": "0.4", "typing-extensions": "4.12", "hjson": "3.0", "py-cpuinfo": "9.0",
          "einops": "0.6", "ninja": "1.11", "msgpack": "1.0", "gguf": "0.10", "transformers": "5.17"}


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- bootstrap

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _installed(dist: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None


def _wheel_fits(name: str) -> bool:
    """Whether a wheel's tags fit this interpreter (pure Python, or this CPython on manylinux x86_64)."""
    _, _, rest = name.removesuffix(".whl").partition("-")
    tags = rest.split("-")[-3:]  # python tag, abi tag, platform tag
    python, abi, plat = tags
    if plat != "any" and not (sys.platform == "linux" and platform.machine() in plat):
        return False
    mine = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return python.startswith("py3") or mine in python.split(".") or abi == "abi3"


def bootstrap(bundle: Path) -> dict[str, str]:
    """Put the bundle's kubetune source and the wheels this host lacks (or has too old) on sys.path.

    A wheel is a zip of its files: extracting the fitting ones into `<bundle>/site` installs them for this
    process without pip, a network or touching the host's environment."""
    site = bundle / "site"
    added: dict[str, str] = {}
    wheels = sorted((bundle / "wheels").glob("*.whl"))

    def missing(dist: str) -> bool:
        have = _installed(dist)
        return have is None or _version_tuple(have) < _version_tuple(NEEDED.get(dist, "0"))

    # pydantic checks that pydantic-core is the exact version it was released with: they go together.
    together = {"pydantic-core": "pydantic"}
    for wheel in wheels:
        dist = wheel.name.split("-")[0].replace("_", "-").lower()
        version = wheel.name.split("-")[1]
        if not (missing(dist) or (dist in together and missing(together[dist]))):
            continue
        if not _wheel_fits(wheel.name) or dist in added:
            continue
        marker = site / f".{wheel.name}"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
            marker.touch()
        added[dist] = version
    for path in (site, bundle / "src", bundle):
        if path.is_dir():
            sys.path.insert(0, str(path))
    return added


# ------------------------------------------------------------------------------------------------ helpers

class Phases:
    """Run phases in order within a time budget; each one's result or error goes into the report."""

    def __init__(self, report: dict[str, Any], deadline: float, out: Path) -> None:
        self.report, self.deadline, self.out = report, deadline, out
        report.setdefault("errors", {})

    def run(self, name: str, fn: Callable[[], Any], needs: float = 0.0) -> Any:
        left = self.deadline - time.monotonic()
        if left < needs:
            self.report["errors"][name] = f"skipped: {left:.0f}s left of the time budget, needs ~{needs:.0f}s"
            say(f"{name}: skipped (time)")
            return None
        say(f"{name}: start")
        started = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (every failure is recorded; the next phase still runs)
            self.report["errors"][name] = f"{type(exc).__name__}: {str(exc)[:1500]}"
            say(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
            result = None
        else:
            if result is not None:
                self.report[name] = result
        say(f"{name}: {time.monotonic() - started:.1f}s")
        self.write()
        return result

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.out / "gpu_check.json")


def _status(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


@contextlib.contextmanager
def host_peak() -> Iterator[dict[str, int]]:
    """The resident set's peak over the block, above where it started (VmHWM reset through clear_refs)."""
    gc.collect()
    result: dict[str, int] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _status("VmRSS")
    yield result
    result["host_peak_bytes"] = max(0, _status("VmHWM") - before)


def gib(n: float) -> float:
    return round(n / 2**30, 3)


class Env:
    """What the run is on: device, dtype, the process group."""

    def __init__(self, dry_run: bool) -> None:
        import torch

        self.dry_run = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.precision = "bf16" if self.cuda else "fp32"

    def init_distributed(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        if self.cuda:
            import torch

            torch.cuda.set_device(0)

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated())
        return None


def _free_port() -> int:
    import socket

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_info(env: Env, installed: dict[str, str]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": _installed("transformers"), "deepspeed": _installed("deepspeed"),
        "installed_from_bundle": installed, "nvcc": shutil.which("nvcc"), "dry_run": env.dry_run,
        "cpu_count": os.cpu_count(),
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": gib(props.total_memory), "gpu_count": torch.cuda.device_count()}
    return info


def gemm(env: Env) -> dict[str, Any]:
    """The best sustained rate of one large matrix product in the training dtype (FLOP/s)."""
    import torch

    n, reps = (8192, 30) if env.cuda else (512, 5)
    a = torch.randn(n, n, device=env.device, dtype=env.dtype)
    b = torch.randn(n, n, device=env.device, dtype=env.dtype)
    for _ in range(3):
        a @ b
    env.synchronize()
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        env.synchronize()
        best = min(best, (time.perf_counter() - started) / reps)
    flops = 2 * n**3 / best
    return {"n": n, "dtype": str(env.dtype).removeprefix("torch."), "flops": flops, "tflops": round(flops / 1e12, 2)}


# ------------------------------------------------------------------------------------------------ the data

def viggo_examples(viggo: Path, tokenizer: Any, max_length: int, limit: int | None) -> tuple[Any, Any, Any, Any]:
    """ViGGO's rows tokenized by the trainer's pre-flight, in the ViGGO template; (train, val, stats, rows)."""
    from kubetune.api.finetunejob import PromptTemplate
    from kubetune.trainer.data import preflight, read_rows

    template = PromptTemplate(special_tokens=list(VIGGO_SPECIAL_TOKENS), prompt="<START_Q>{ref}<END_Q>",
                              completion="<START_A>{mr}", stop="<END_A>")
    train_rows = read_rows(viggo / "train.csv", "csv")
    val_rows = read_rows(viggo / "valid.csv", "csv")
    if limit is not None:
        train_rows, val_rows = train_rows[:limit], val_rows[:max(2, limit // 4)]
    data = preflight(train_rows, val_rows, template, tokenizer, max_length, "completion")
    return data.train, data.val, data.stats, (template, val_rows)


def ds_config(env: Env, stage: int, batch: int, lr: float) -> tuple[dict[str, Any], str]:
    """The trainer's DeepSpeed config for one GPU (or the CPU); FusedAdam needs nvcc to build, so without
    one torch's AdamW is used (said in the report)."""
    from kubetune.api.finetunejob import DeepSpeedSpec, Hyperparameters
    from kubetune.trainer.deepspeed_config import deepspeed_config

    hp = Hyperparameters(learning_rate=lr, per_device_batch_size=batch, epochs=1, max_grad_norm=1.0)
    spec = DeepSpeedSpec(zero_stage=stage, offload_optimizer="none", precision=env.precision)
    config = deepspeed_config(spec, hp, world_size=1, on_gpu=env.cuda)
    params = config["optimizer"]["params"]
    if env.cuda and not shutil.which("nvcc"):
        params["torch_adam"] = True
    optimizer = "torch.optim.AdamW" if params.get("torch_adam") else "DeepSpeed FusedAdam"
    return config, optimizer


# ------------------------------------------------------------------------------------------ step (part a)

def build_model_dir(env: Env, tokenizer: Any, shape: dict[str, Any], where: Path) -> int:
    """A random Llama of `shape` saved as a checkpoint with `tokenizer` (the trainer then loads it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(config).to(env.dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    del model
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
    return params


def model_flops_per_token(params: int, layers: int, hidden: int, seq: float) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward), plus attention's 12 * L * h * s."""
    return 6 * params + 12 * layers * hidden * seq


def one_stage(env: Env, stage: int, model_dir: Path, cache: Path, train: list[Any], batch: int, steps: int,
              warmup: int, pad_id: int, peak_flops: float, consolidate_into: Path) -> dict[str, Any]:
    import torch

    from kubetune.trainer import consolidate
    from kubetune.trainer.data import collate, stream_batches
    from kubetune.trainer.engine import initialize, load_for_training, to_device
    from kubetune.trainer.model import ModelSource
    from kubetune.trainer.output import local_filesystem
    from kubetune.trainer.schedule import lr_lambda

    env.reset_peak()
    model, tokenizer = load_for_training(ModelSource(path=model_dir), cache, VIGGO_SPECIAL_TOKENS, dtype=env.dtype)
    params = sum(p.numel() for p in model.parameters())
    config, optimizer = ds_config(env, stage, batch, lr=1e-5)
    engine, _ = initialize(model, config, lr_lambda("constant", 0, warmup + steps))
    batches = stream_batches(iter(train * (1 + (warmup + steps) * batch // max(1, len(train)))), batch, seed=0)
    real = padded = 0
    seqs = 0.0
    started = 0.0
    for i in range(warmup + steps):
        examples = next(batches)
        if i == warmup:
            env.synchronize()
            started = time.perf_counter()
        batch_t = to_device(collate(examples, pad_id), env.device)
        loss = engine(**batch_t).loss
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            real += int(batch_t["attention_mask"].sum())
            padded += batch_t["input_ids"].numel()
            seqs += batch_t["input_ids"].shape[1]
    env.synchronize()
    seconds = time.perf_counter() - started
    cfg = engine.module.config
    per_token = model_flops_per_token(params, cfg.num_hidden_layers, cfg.hidden_size, seqs / steps)
    result: dict[str, Any] = {
        "zero_stage": stage, "optimizer": optimizer, "params": params, "batch_size": batch, "steps": steps,
        "step_ms": round(1000 * seconds / steps, 2), "tokens_per_s": round(padded / seconds, 1),
        "real_tokens_per_s": round(real / seconds, 1), "padding": round(1 - real / padded, 4),
        "mean_sequence": round(seqs / steps, 1), "last_loss": round(float(loss.detach()), 4),
        "achieved_tflops": round(per_token * padded / seconds / 1e12, 3),
        "mfu_vs_measured_gemm": round(per_token * padded / seconds / peak_flops, 4),
        "peak_gpu_memory_gib": gib(env.peak() or 0) if env.cuda else None,
    }
    # The streamed consolidated checkpoint of these weights: host and GPU memory against its largest shard.
    shard = 256 * 2**20 if env.cuda else 64 * 1024
    env.reset_peak()
    base = torch.cuda.memory_allocated() if env.cuda else 0
    with host_peak() as host:
        written = consolidate.publish_model(engine.module, tokenizer, local_filesystem(), str(consolidate_into),
                                            rank=0, metadata={"check": f"zero{stage}"}, max_shard_bytes=shard)
    result["consolidation"] = {
        "seconds": round(written.seconds, 2), "bytes": written.total_bytes, "files": len(written.files),
        "largest_shard_bytes": written.largest_shard_bytes, "host_peak_bytes": host["host_peak_bytes"],
        "gpu_peak_extra_bytes": (env.peak() or 0) - base if env.cuda else None,
        "write_gb_per_s": round(written.total_bytes / max(written.seconds, 1e-9) / 1e9, 3),
        "matches_engine": _matches(engine, consolidate_into),
    }
    del engine, model, batches
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
    return result


def _matches(engine: Any, directory: Path, samples: int = 4) -> bool:
    """A few of the written tensors (first, last, some between) equal the engine's (gathered) weights."""
    import torch
    from safetensors import safe_open

    from kubetune.trainer import consolidate

    entries = consolidate.model_entries(engine.module)
    index = directory / consolidate.INDEX_FILE
    where = (json.loads(index.read_text())["weight_map"] if index.exists()
             else {e.name: consolidate.SINGLE_FILE for e in entries})
    picks = {0, len(entries) - 1, *range(0, len(entries), max(1, len(entries) // samples))}
    for i in sorted(picks):
        entry = entries[i]
        with consolidate.gathered([entry]), safe_open(str(directory / where[entry.name]), "pt") as f:
            if not torch.equal(f.get_tensor(entry.name), entry.tensor.detach().cpu()):
                return False
    return True


def step_check(env: Env, args: argparse.Namespace, peak_flops: float, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from kubetune.trainer.engine import pad_token_id
    from kubetune.trainer.model import add_special_tokens_to_tokenizer

    env.init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model_dir = work / "llama"
    shape = LLAMA_TINY if env.dry_run else LLAMA_1B
    params = build_model_dir(env, tokenizer, shape, model_dir)
    add_special_tokens_to_tokenizer(tokenizer, VIGGO_SPECIAL_TOKENS)  # as the driver does, for tokenizing
    train, _, stats, _ = viggo_examples(args.viggo, tokenizer, 256, 512 if env.dry_run else None)
    result: dict[str, Any] = {"model": {"shape": shape, "params_before_special_tokens": params},
                              "data": {"rows": len(train), "mean_tokens": stats["train"]["mean_tokens"]}}
    batch, steps, warmup = (4, 3, 1) if env.dry_run else (args.step_batch, args.step_steps, 3)
    for stage in (2, 3):
        result[f"zero{stage}"] = one_stage(env, stage, model_dir, work / "cache", train, batch, steps, warmup,
                                           pad_token_id(tokenizer), peak_flops, work / f"consolidated-zero{stage}")
        shutil.rmtree(work / f"consolidated-zero{stage}", ignore_errors=True)
        say(f"step zero{stage}: {json.dumps(result[f'zero{stage}'])}")
    shutil.rmtree(model_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------- viggo (part b)

def smollm2_dir(args: argparse.Namespace, work: Path) -> Path:
    """SmolLM2-135M-Instruct as a checkpoint directory: --base-model, else the bundle's GGUF parts joined
    (sha256 checked) and converted by smollm2.py."""
    import hashlib

    if args.base_model is not None:
        return Path(args.base_model)
    manifest = json.loads((args.bundle / "model.json").read_text())
    gguf = work / "gguf" / manifest["file"]
    gguf.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for part in manifest["parts"]:
            found = [d / part["name"] for d in (args.bundle / "model", args.bundle.parent / "gpu-check-model" / "model")
                     if (d / part["name"]).exists()]
            if not found:
                raise FileNotFoundError(f"{part['name']}: not carried (gpu-check-model/ travels in a second call)")
            data = found[0].read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ValueError(f"{part['name']}: sha256 differs from the bundle's manifest")
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != manifest["sha256"]:
        raise ValueError(f"{manifest['file']}: sha256 differs from the bundle's manifest")
    from smollm2 import convert_gguf

    return convert_gguf(gguf, work / "converted")


def viggo_check(env: Env, args: argparse.Namespace, peak_flops: float, work: Path) -> dict[str, Any]:
    import torch

    from kubetune.trainer.data import collate, stream_batches
    from kubetune.trainer.engine import initialize, load_for_training, mean_loss, pad_token_id, to_device
    from kubetune.trainer.model import ModelSource
    from kubetune.trainer.schedule import lr_lambda, warmup_steps_for

    env.init_distributed()
    started = time.monotonic()
    base = smollm2_dir(args, work)
    converted = time.monotonic() - started
    model, tokenizer = load_for_training(ModelSource(path=base), work / "cache", VIGGO_SPECIAL_TOKENS, dtype=env.dtype)
    pad_id = pad_token_id(tokenizer)
    limit = 48 if env.dry_run else None
    train, val, stats, (template, val_rows) = viggo_examples(args.viggo, tokenizer, 256, limit)
    epochs = 1 if env.dry_run else args.viggo_epochs
    batch = 8 if env.dry_run else args.viggo_batch
    steps_per_epoch = math.ceil(len(train) / batch)
    total = steps_per_epoch * epochs
    config, optimizer = ds_config(env, 2, batch, args.viggo_lr)
    engine, _ = initialize(model, config, lr_lambda("cosine", warmup_steps_for(0.05, total), total))

    def val_batches() -> Iterator[dict[str, torch.Tensor]]:
        for examples in stream_batches(iter(val), batch, shuffle=False):
            yield collate(examples, pad_id)

    base_loss = mean_loss(engine, val_batches(), env.device)
    history = []
    tokens = 0
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        env.synchronize()
        epoch_start = time.perf_counter()
        losses = []
        for examples in stream_batches(iter(train), batch, seed=0, epoch=epoch):
            b = to_device(collate(examples, pad_id), env.device)
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            tokens += int(b["attention_mask"].sum())
        env.synchronize()
        train_seconds += time.perf_counter() - epoch_start
        val_loss = mean_loss(engine, val_batches(), env.device)
        history.append({"epoch": epoch, "train_loss": round(sum(losses) / len(losses), 4),
                        "val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(min(val_loss, 50)), 4)})
        say(f"viggo epoch {epoch}: {history[-1]}")
    params = sum(p.numel() for p in engine.module.parameters())
    cfg = engine.module.config
    per_token = model_flops_per_token(params, cfg.num_hidden_layers, cfg.hidden_size, stats["train"]["mean_tokens"])
    generation = generate_and_score(env, engine.module, tokenizer, template, val_rows,
                                    8 if env.dry_run else len(val_rows), args.gen_batch)
    return {
        "base_model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)" if args.base_model is None else "given",
        "convert_seconds": round(converted, 1), "optimizer": optimizer, "zero_stage": 2,
        "precision": env.precision, "epochs": history, "rows": {"train": len(train), "validation": len(val)},
        "batch_size": batch, "learning_rate": args.viggo_lr, "steps": total,
        "base_val_perplexity": round(math.exp(min(base_loss, 50)), 4),
        "train_seconds": round(train_seconds, 1), "real_tokens_per_s": round(tokens / train_seconds, 1),
        "mfu_vs_measured_gemm": round(per_token * tokens / train_seconds / peak_flops, 4),
        "peak_gpu_memory_gib": gib(env.peak() or 0) if env.cuda else None,
        "generation": generation,
    }


def generate_and_score(env: Env, model: Any, tokenizer: Any, template: Any, rows: list[Any], n: int,
                       batch: int) -> dict[str, Any]:
    """Greedy decoding of held-out rows in the fine-tuned model's own format (the training prompt plus the
    completion's literal prefix, stopping at the stop token: what an EvalJob sends), scored by `viggo`.
    Only metrics are reported: the model's output is never echoed."""
    import torch

    from kubetune.contract.evalplan import completion_prefix
    from kubetune.contract.templates import fill_template
    from kubetune.serving.scorers import score

    rows = rows[:n]
    prompts = [fill_template(template.prompt, r.fields) + completion_prefix(template.completion) for r in rows]
    golds = [r.fields["mr"] for r in rows]
    stop = tokenizer.convert_tokens_to_ids(template.stop)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # SmolLM2's has none; the attention mask hides whatever pads
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.config.use_cache = True
    predictions: list[str] = []
    new_tokens = 0
    env.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            enc = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(env.device)
            out = model.generate(**enc, max_new_tokens=128, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                ids = row.tolist()
                ids = ids[:ids.index(stop)] if stop in ids else ids
                new_tokens += len(ids)
                predictions.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    env.synchronize()
    seconds = time.perf_counter() - started
    scored = score("viggo", predictions, golds, [r.fields for r in rows])
    return {"rows": len(rows), "batch_size": batch, "seconds": round(seconds, 2),
            "new_tokens_per_s": round(new_tokens / seconds, 1),
            "metrics": {k: round(v, 4) for k, v in scored.metrics.items()}, "kept": scored.kept}


# ----------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: a tiny model, a few steps")
    parser.add_argument("--bundle", type=Path, default=HERE, help="the gpu-check/ folder (default: this one's)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer of the step check (default: the bundle's)")
    parser.add_argument("--viggo", type=Path, help="folder with ViGGO's train.csv and valid.csv")
    parser.add_argument("--base-model", type=Path, help="checkpoint to fine-tune on ViGGO (default: SmolLM2)")
    parser.add_argument("--only", choices=("step", "viggo"), help="run only this check (and gemm)")
    parser.add_argument("--time-limit", type=float, default=460.0, help="seconds for the whole run")
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--step-steps", type=int, default=20)
    parser.add_argument("--viggo-epochs", type=int, default=3)
    parser.add_argument("--viggo-batch", type=int, default=32)
    parser.add_argument("--viggo-lr", type=float, default=1e-4)
    parser.add_argument("--gen-batch", type=int, default=128)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.bundle = args.bundle.resolve()
    installed = bootstrap(args.bundle)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no GPU here (torch.cuda.is_available() is False): run it on a GPU host, or with --dry-run",
              file=sys.stderr)
        return 2
    args.tokenizer = args.tokenizer or args.bundle / "tokenizer"
    args.viggo = args.viggo or args.bundle / "data" / "viggo"

    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    phases = Phases(report, deadline, args.output)
    env = Env(args.dry_run)
    phases.run("host", lambda: host_info(env, installed))
    measured = phases.run("gemm", lambda: gemm(env))
    peak_flops = measured["flops"] if measured else math.nan
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if args.only in (None, "step"):
            phases.run("step", lambda: step_check(env, args, peak_flops, work), needs=30.0)
        if args.only in (None, "viggo"):
            phases.run("viggo", lambda: viggo_check(env, args, peak_flops, work), needs=60.0)
    report["seconds"] = round(args.time_limit - (deadline - time.monotonic()), 1)
    phases.write()
    say(f"wrote {args.output / 'gpu_check.json'}; errors: {sorted(report['errors']) or 'none'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
