"""Model loading, URIs, special tokens, DeepSpeed configs and LR schedules of the trainer."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import math
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import fsspec
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kubetune.api.finetunejob import DeepSpeedSpec, Hyperparameters
from kubetune.contract.storage import resolve_uri
from kubetune.trainer.deepspeed_config import deepspeed_config, has_scheduler
from kubetune.trainer.model import (
    ModelSource,
    add_special_tokens,
    add_special_tokens_to_tokenizer,
    load_model,
    load_tokenizer,
)
from kubetune.trainer.schedule import lr_lambda, warmup_steps_for
from support.workspace import VIGGO_SPECIAL_TOKENS, build_tiny_tokenizer, tiny_llama
from viggo_like import viggo_like_rows

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [f"<START_Q>{r['ref']}<END_Q><START_A>{r['mr']}<END_A>" for r in viggo_like_rows(60, seed=1)]


@pytest.fixture
def tokenizer(texts: list[str]) -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer(texts, special_tokens=VIGGO_SPECIAL_TOKENS, vocab_size=300)


@pytest.fixture
def memory_fs() -> Iterator[tuple[Any, str]]:
    """fsspec's in-memory filesystem and a fresh bucket name in it (removed afterwards)."""
    fs = fsspec.filesystem("memory")
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    yield fs, bucket
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


# ---------------------------------------------------------------------------------------------- URIs

def test_pvc_uri_maps_under_the_pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    assert resolve_uri("pvc://models/llama/7b", tmp_path) == tmp_path / "pvc" / "models" / "llama" / "7b"
    assert resolve_uri("pvc://data/train.jsonl", tmp_path) == tmp_path / "pvc" / "data" / "train.jsonl"
    assert resolve_uri("pvc://data", tmp_path) == tmp_path / "pvc" / "data"
    monkeypatch.delenv("KUBETUNE_PVC_ROOT")
    assert resolve_uri("pvc://models/llama", tmp_path) == Path("/mnt/pvc/models/llama")


@pytest.mark.parametrize("uri", ["pvc://", "pvc:///path", "pvc://claim/../etc/passwd"])
def test_bad_pvc_uris_are_refused(uri: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pvc://"):
        resolve_uri(uri, tmp_path)


def test_file_and_plain_paths(tmp_path: Path) -> None:
    assert resolve_uri("file:///srv/models/x", tmp_path) == Path("/srv/models/x")
    assert resolve_uri("file://localhost/srv/a%20b", tmp_path) == Path("/srv/a b")
    assert resolve_uri("/srv/models/x", tmp_path) == Path("/srv/models/x")
    assert resolve_uri("data/train.jsonl", tmp_path) == Path("data/train.jsonl")
    with pytest.raises(ValueError, match="file://"):
        resolve_uri("file://otherhost/x", tmp_path)


def test_remote_file_is_copied_into_the_cache_once(tmp_path: Path, memory_fs: tuple[Any, str]) -> None:
    fs, bucket = memory_fs
    fs.pipe(f"/{bucket}/data/train.jsonl", b'{"a": 1}\n')
    uri = f"memory://{bucket}/data/train.jsonl"
    local = resolve_uri(uri, tmp_path / "cache")
    assert local.is_file() and local.read_bytes() == b'{"a": 1}\n'
    assert tmp_path / "cache" in local.parents
    fs.pipe(f"/{bucket}/data/train.jsonl", b"changed\n")  # a second resolve does not copy again
    assert resolve_uri(uri, tmp_path / "cache") == local
    assert local.read_bytes() == b'{"a": 1}\n'
    leftovers = [p.name for p in local.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_remote_directory_is_copied_as_a_tree(tmp_path: Path, memory_fs: tuple[Any, str]) -> None:
    fs, bucket = memory_fs
    fs.pipe(f"/{bucket}/models/tiny/config.json", b"{}")
    fs.pipe(f"/{bucket}/models/tiny/weights/part-1.bin", b"\x00\x01")
    local = resolve_uri(f"memory://{bucket}/models/tiny/", tmp_path)
    assert local.is_dir()
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == [
        "config.json", "weights/part-1.bin"]
    assert (local / "weights" / "part-1.bin").read_bytes() == b"\x00\x01"
    assert resolve_uri(f"memory://{bucket}/models/tiny", tmp_path) == local


def test_missing_remote_object_and_unknown_protocols(tmp_path: Path, memory_fs: tuple[Any, str]) -> None:
    _, bucket = memory_fs
    with pytest.raises(FileNotFoundError, match=f"memory://{bucket}/nothing"):
        resolve_uri(f"memory://{bucket}/nothing", tmp_path)
    with pytest.raises(ValueError, match="nosuchproto://x/y"):
        resolve_uri("nosuchproto://x/y", tmp_path)


def test_a_missing_fsspec_backend_is_named(tmp_path: Path) -> None:
    # Azure's backend (adlfs) is not a kubetune dependency; s3fs is.
    with pytest.raises(ImportError, match=r"abfs://container/model.*adlfs"):
        resolve_uri("abfs://container/model", tmp_path)


# --------------------------------------------------------------------------------- models and tokens

def test_tiny_llama_is_small_and_deterministic() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(300), tiny_llama(300), tiny_llama(300, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    params = sum(p.numel() for p in a.parameters())
    assert 50_000 < params < 150_000
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


@pytest.mark.parametrize("tied", [True, False])
def test_special_tokens_get_new_ids_and_mean_embeddings(tokenizer: PreTrainedTokenizerBase, tied: bool) -> None:
    base = len(tokenizer)
    model = tiny_llama(base, tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    added = add_special_tokens(model, tokenizer, VIGGO_SPECIAL_TOKENS)

    assert added == 4 and len(tokenizer) == base + 4
    ids = tokenizer.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS)
    assert sorted(ids) == list(range(base, base + 4))
    emb = model.get_input_embeddings().weight
    assert emb.shape == (base + 4, 64) and model.config.vocab_size == base + 4
    assert torch.equal(emb[:base], old_in)  # the old rows are untouched
    for i in ids:
        torch.testing.assert_close(emb[i], old_in.mean(dim=0))
    head = model.get_output_embeddings().weight
    assert head.shape == (base + 4, 64)
    assert (head is emb) == tied  # still tied, or resized on its own
    if not tied:
        for i in ids:
            torch.testing.assert_close(head[i], old_out.mean(dim=0))
    # The model runs on the new ids.
    logits = model(input_ids=torch.tensor([[ids[0], 5, ids[1]]])).logits
    assert logits.shape == (1, 3, base + 4)


def test_special_tokens_are_atomic_special_and_idempotent(tokenizer: PreTrainedTokenizerBase) -> None:
    base = len(tokenizer)
    model = tiny_llama(base)
    assert add_special_tokens(model, tokenizer, ["<START_Q>", "<END_Q>"]) == 2
    # More tokens later, one of them already known and one already in the vocabulary (EOS):
    assert add_special_tokens(model, tokenizer, ["<END_Q>", "<START_A>", "</s>"]) == 1
    assert add_special_tokens(model, tokenizer, ["<START_A>"]) == 0
    assert model.get_input_embeddings().weight.shape[0] == base + 3 == len(tokenizer)
    start_q, end_q, start_a = tokenizer.convert_tokens_to_ids(["<START_Q>", "<END_Q>", "<START_A>"])
    # Earlier extra special tokens stay special (replace_extra_special_tokens=False).
    assert {"<START_Q>", "<END_Q>", "<START_A>", "</s>"} <= set(tokenizer.all_special_tokens)
    ids = tokenizer.encode("<START_Q>Portal 2<END_Q><START_A>", add_special_tokens=False)
    assert ids[0] == start_q and ids[-2:] == [end_q, start_a]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Portal 2"
    assert add_special_tokens(model, tokenizer, []) == 0


def test_tokenizer_only_half_gives_the_same_ids(texts: list[str]) -> None:
    a = build_tiny_tokenizer(texts, VIGGO_SPECIAL_TOKENS, vocab_size=300)
    b = build_tiny_tokenizer(texts, VIGGO_SPECIAL_TOKENS, vocab_size=300)
    ids = add_special_tokens_to_tokenizer(a, VIGGO_SPECIAL_TOKENS)
    add_special_tokens(tiny_llama(len(b)), b, VIGGO_SPECIAL_TOKENS)
    assert ids == b.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS) == a.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS)


def test_saved_tokenizer_and_model_keep_the_special_tokens(tokenizer: PreTrainedTokenizerBase,
                                                           tmp_path: Path) -> None:
    model = tiny_llama(len(tokenizer))
    add_special_tokens(model, tokenizer, VIGGO_SPECIAL_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS)
    tokenizer.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS) == ids
    assert set(VIGGO_SPECIAL_TOKENS) <= set(again.all_special_tokens)
    text = "<START_Q>Halo 3<END_Q>"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.decode(again.encode(text), skip_special_tokens=True) == "Halo 3"

    # Through the module's own loaders (a local directory, and a pvc:// uri to it), in bf16.
    source = ModelSource(path=tmp_path)
    assert load_tokenizer(source, tmp_path / "cache").convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS) == ids
    reloaded = load_model(source, tmp_path / "cache", torch.bfloat16)
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight.float(),
                               model.get_input_embeddings().weight.to(torch.bfloat16).float())


def test_model_source_from_the_api_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    src = ModelSource.resolve(uri="pvc://models/smol", cache_dir=tmp_path)
    assert src == ModelSource(path=tmp_path / "models" / "smol")
    hub = ModelSource.resolve(name="org/model", revision="main", cache_dir=tmp_path)
    assert hub.name == "org/model" and hub.revision == "main" and hub.path is None
    with pytest.raises(ValueError, match="exactly one"):
        ModelSource.resolve(name="a", uri="/b", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        ModelSource()


def test_a_gguf_file_is_refused_with_a_pointer_to_the_conversion(tmp_path: Path) -> None:
    file = tmp_path / "m.Q4_1.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="smollm2.py"):
        load_model(ModelSource(path=file), tmp_path / "cache")
    with pytest.raises(ValueError, match="GGUF files are not loaded"):
        load_tokenizer(ModelSource.resolve(uri=str(file), cache_dir=tmp_path), tmp_path / "cache")


# ------------------------------------------------------------------------------------------ DeepSpeed

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.config import DeepSpeedConfig

SPEC_COMBOS = [(0, "none", "none"), (1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"),
               (2, "cpu", "none"), (3, "none", "none"), (3, "cpu", "none"), (3, "none", "cpu"),
               (3, "cpu", "cpu")]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeedConfig reads the world size from torch.distributed; pretend it is `n` ranks."""
    def set_world(n: int) -> None:
        monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: n)
    return set_world


@pytest.mark.parametrize("on_gpu", [False, True])
@pytest.mark.parametrize(("stage", "offload_optimizer", "offload_params"), SPEC_COMBOS)
def test_deepspeed_config_from_the_spec_validates(stage: int, offload_optimizer: str, offload_params: str,
                                                  on_gpu: bool, world: Any) -> None:
    ds = DeepSpeedSpec(zero_stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                       precision="bf16")
    hp = Hyperparameters(per_device_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-5,
                         weight_decay=0.01, max_grad_norm=1.0)
    notes: list[str] = []
    config = deepspeed_config(ds, hp, world_size=3, on_gpu=on_gpu, notes=notes)
    world(3)
    parsed = DeepSpeedConfig(copy.deepcopy(config))

    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
            parsed.train_batch_size) == (4, 2, 24)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_clipping == 1.0
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params["lr"] == 3e-5 and parsed.optimizer_params["weight_decay"] == 0.01
    assert "scheduler" not in config and parsed.scheduler_name is None
    zero = config["zero_optimization"]
    assert ("offload_optimizer" in zero) == (offload_optimizer == "cpu")
    assert ("offload_param" in zero) == (offload_params == "cpu")
    if offload_optimizer == "cpu":
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        assert parsed.zero_config.offload_optimizer.pin_memory == on_gpu
    if offload_params == "cpu":
        assert parsed.zero_config.offload_param.device == "cpu"
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save
    # torch's AdamW only on CPU without offload (with offload DeepSpeed picks DeepSpeedCPUAdam).
    assert config["optimizer"]["params"].get("torch_adam", False) == (not on_gpu and offload_optimizer == "none")
    # bf16 only on a GPU; on CPU fp32, and the caller is told.
    assert parsed.bfloat16_config.enabled == on_gpu
    assert not parsed.float16_config.enabled
    assert any("fp32" in n for n in notes) == (not on_gpu)


def test_stage_0_is_plain_data_parallel(world: Any) -> None:
    config = deepspeed_config(DeepSpeedSpec(zero_stage=0, offload_optimizer="none"), Hyperparameters(),
                              world_size=2, on_gpu=True)
    assert config["zero_optimization"] == {"stage": 0}
    world(2)
    assert not DeepSpeedConfig(config).zero_enabled


def test_fp16_and_fp32_and_no_clipping(world: Any) -> None:
    fp16 = deepspeed_config(DeepSpeedSpec(precision="fp16"), Hyperparameters(max_grad_norm=0), 1, on_gpu=True)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and not fp16["bf16"]["enabled"]
    assert fp16["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default is 1.0
    world(1)
    parsed = DeepSpeedConfig(fp16)
    assert parsed.float16_config.enabled and parsed.gradient_clipping == 0.0
    fp32 = deepspeed_config(DeepSpeedSpec(precision="fp32"), Hyperparameters(), 1, on_gpu=True)
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"]


HF_STYLE_RAW: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True,
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "steps_per_print": 50,
}


def test_raw_config_fills_auto_values_from_the_spec(world: Any) -> None:
    raw = copy.deepcopy(HF_STYLE_RAW)
    hp = Hyperparameters(per_device_batch_size=8, gradient_accumulation_steps=4, learning_rate=2e-5,
                         weight_decay=0.1, max_grad_norm=0.5)
    config = deepspeed_config(DeepSpeedSpec(precision="bf16"), hp, world_size=4, on_gpu=True, raw=raw,
                              hidden_size=1024)
    assert raw == HF_STYLE_RAW  # the caller's dict is not modified
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (8, 4, 128)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                             "weight_decay": 0.1}
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024 and zero["stage3_param_persistence_threshold"] == 10240
    # Everything else as the user wrote it.
    assert zero["overlap_comm"] is True and zero["offload_optimizer"]["pin_memory"] is True
    assert config["steps_per_print"] == 50 and "scheduler" not in config
    world(4)
    assert DeepSpeedConfig(config).train_batch_size == 128

    # Without a hidden size the bucket "auto"s fall back to DeepSpeed's defaults; on CPU bf16 is off.
    cpu = deepspeed_config(DeepSpeedSpec(precision="bf16"), hp, world_size=4, on_gpu=False, raw=raw)
    assert "reduce_bucket_size" not in cpu["zero_optimization"]
    assert cpu["bf16"] == {"enabled": False}
    assert DeepSpeedConfig(cpu).zero_config.reduce_bucket_size > 0


def test_raw_batch_sizes_are_made_consistent_with_the_world_size() -> None:
    hp = Hyperparameters(per_device_batch_size=4, gradient_accumulation_steps=1)
    ds = DeepSpeedSpec()
    # A fixed global batch with "auto" accumulation: the accumulation follows from the world size.
    c = deepspeed_config(ds, hp, 2, False, raw={"train_batch_size": 32, "gradient_accumulation_steps": "auto"})
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (4, 4, 32)
    # Keys missing altogether are filled too.
    c = deepspeed_config(ds, hp, 3, False, raw={"zero_optimization": {"stage": 2}})
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (4, 1, 12)
    # The user's micro batch wins over the spec's.
    c = deepspeed_config(ds, hp, 2, False, raw={"train_micro_batch_size_per_gpu": 2})
    assert c["train_batch_size"] == 4
    # A fixed triple that does not multiply out for this world size.
    with pytest.raises(ValueError, match="train_batch_size 32 != .* world size 3"):
        deepspeed_config(ds, hp, 3, False, raw={"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                                                 "gradient_accumulation_steps": 4})
    with pytest.raises(ValueError, match="train_batch_size"):
        deepspeed_config(ds, hp, 3, False, raw={"train_batch_size": 10})
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        deepspeed_config(ds, hp, 1, False, raw={"gradient_accumulation_steps": 0})


def test_raw_config_optimizer_scheduler_and_unfillable_autos() -> None:
    ds, hp = DeepSpeedSpec(), Hyperparameters(learning_rate=1e-4)
    notes: list[str] = []
    c = deepspeed_config(ds, hp, 1, False, raw={"zero_optimization": {"stage": 1}}, notes=notes)
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["torch_adam"] is True
    assert any("no optimizer" in n for n in notes)
    assert not has_scheduler(c)

    raw = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                             "warmup_num_steps": "auto",
                                                             "total_num_steps": "auto"}}}
    with pytest.raises(ValueError, match="scheduler.params.warmup_num_steps"):
        deepspeed_config(ds, hp, 1, False, raw=raw)
    c = deepspeed_config(ds, hp, 1, False, raw=raw, total_steps=100, warmup_steps=10)
    assert c["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-4, "warmup_num_steps": 10,
                                        "total_num_steps": 100}
    assert has_scheduler(c)
    with pytest.raises(ValueError, match="activation_checkpointing.number_checkpoints"):
        deepspeed_config(ds, hp, 1, False, raw={"activation_checkpointing": {"number_checkpoints": "auto"}})
    with pytest.raises(TypeError):
        deepspeed_config(ds, hp, 1, False, raw=[])  # type: ignore[arg-type]


ENGINE_SCRIPT = """
import json, sys, torch, deepspeed
from kubetune.api.finetunejob import DeepSpeedSpec, Hyperparameters
from kubetune.trainer.deepspeed_config import deepspeed_config
from support.workspace import tiny_llama

deepspeed.init_distributed(dist_backend="gloo")
results = {}
for stage, opt, params in json.loads(sys.argv[1]):
    model = tiny_llama(300)
    config = deepspeed_config(DeepSpeedSpec(zero_stage=stage, offload_optimizer=opt, offload_params=params),
                              Hyperparameters(per_device_batch_size=2, learning_rate=1e-2), 1, on_gpu=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    tiny_llama(300).load_state_dict(state)  # one complete state dict
    results[f"{stage}-{opt}-{params}"] = {"losses": losses, "optimizer": type(engine.basic_optimizer).__name__}
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_engines_train_with_these_configs_on_cpu(tmp_path: Path) -> None:
    """deepspeed.initialize + a few steps for every stage and offload option, one process over gloo.

    The first run compiles DeepSpeed's shm_comm (~35 s) and cpu_adam (~110 s, for optimizer offload)
    ops into TORCH_EXTENSIONS_DIR (default ~/.cache/kubetune/torch_extensions, shared with `kubetune run`).
    """
    import json
    import subprocess

    combos = [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (3, "none", "none"),
              (2, "cpu", "none"), (3, "cpu", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29571", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "kubetune" / "torch_extensions"))}
    out = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, json.dumps(combos)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=850, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.split("RESULTS", 1)[1])
    for key, result in results.items():
        assert result["losses"][-1] < result["losses"][0], key  # it learns
        # torch's AdamW without offload on CPU (torch_adam), DeepSpeedCPUAdam picked by DeepSpeed with offload.
        assert result["optimizer"] == ("DeepSpeedCPUAdam" if "-cpu-" in key else "AdamW"), key


# ------------------------------------------------------------------------------------------ schedule

def test_lr_lambda_shapes() -> None:
    cosine = lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert [cosine(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]  # linear warmup
    assert all(cosine(s) < cosine(s - 1) for s in range(11, 111))  # then decays
    assert cosine(60) == pytest.approx(0.5)  # half way through the decay
    assert cosine(110) == pytest.approx(0.0, abs=1e-12) and cosine(500) == pytest.approx(0.0, abs=1e-12)

    linear = lr_lambda("linear", warmup_steps=0, total_steps=100)
    assert linear(0) == 1.0 and linear(25) == pytest.approx(0.75) and linear(100) == 0.0

    constant = lr_lambda("constant", warmup_steps=0, total_steps=50)
    assert all(constant(s) == 1.0 for s in range(60))
    warm_constant = lr_lambda("constant", warmup_steps=4, total_steps=50)
    assert [warm_constant(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

    assert warmup_steps_for(0.1, 95) == 10 and warmup_steps_for(0.0, 95) == 0
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_lambda("step", 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda("cosine", 0, 0)


def test_lr_lambda_drives_lambda_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("cosine", 2, 6))
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
