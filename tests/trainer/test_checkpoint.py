"""Sharded epoch checkpoints and the streamed consolidated checkpoint, without Ray.

Two real ranks (fresh processes over gloo) run DeepSpeed ZeRO-3 on CPU with the trainer's own pieces
(kubetune.trainer.engine, checkpoint, consolidate), once, for every test here:

- on a tiny random Llama, run A trains epoch 1 (a warming-up LR schedule), writes the epoch checkpoint and
  trains epoch 2; run B starts from other random weights, loads that checkpoint (as a retried job does)
  and trains epoch 2 on the same batches; B's weights are then published as a consolidated checkpoint
  in 64 KiB shards;
- a random Llama of 21.5M parameters (86 MB in fp32), large enough for a whole-model copy to stand out, is
  published in 8 MiB shards, the bytes each rank held at once during that consolidation counted exactly
  (torch's allocations and Python's; `support.distributed.allocation_peak`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from support.distributed import allocation_peak, run_ranks

MIB = 2**20
TINY_SHARD = 64 * 1024
MAX_SHARD = 8 * MIB
LARGE = {"hidden": 512, "layers": 8, "heads": 8}  # + vocab 1024: 21.5M parameters, 86 MB in fp32


def _config(world: int, stage: int) -> dict[str, Any]:
    from kubetune.api.finetunejob import DeepSpeedSpec, Hyperparameters
    from kubetune.trainer.deepspeed_config import deepspeed_config

    hp = Hyperparameters(learning_rate=3e-3, per_device_batch_size=2, epochs=2)
    spec = DeepSpeedSpec(zero_stage=stage, offload_optimizer="none", precision="fp32")
    return deepspeed_config(spec, hp, world_size=world, on_gpu=False)


def _batches(rank: int, epoch: int, n: int = 4) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1000 * epoch + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 24), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _epoch(engine: Any, rank: int, epoch: int) -> list[float]:
    losses = []
    for batch in _batches(rank, epoch):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _optimizer_state(engine: Any) -> list[Any]:
    """This rank's partition of the fp32 master weights and Adam moments, the LR scheduler, the counters."""
    inner = engine.optimizer.optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    moments = [(inner.state[p]["exp_avg"].clone(), inner.state[p]["exp_avg_sq"].clone()) for p in params]
    return [[p.detach().clone() for p in params], moments, engine.lr_scheduler.state_dict(), engine.global_steps]


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _zero3_ranks(rank: int, world: int, out: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from kubetune.trainer import checkpoint, consolidate
    from kubetune.trainer.engine import initialize
    from kubetune.trainer.output import local_filesystem
    from kubetune.trainer.schedule import lr_lambda
    from support.workspace import tiny_llama

    ds_config = _config(world, stage=3)
    schedule = lr_lambda("linear", warmup_steps=3, total_steps=8)
    directory = Path(out) / "checkpoints" / "epoch-0001"
    fs = local_filesystem()

    a, _ = initialize(tiny_llama(256, seed=0), ds_config, schedule)
    epoch1 = _epoch(a, rank, 1)
    checkpoint.save(a, directory, {**checkpoint.new_state(world), "epoch": 1, "step": a.global_steps}, rank)
    saved = _optimizer_state(a)
    uninterrupted = _epoch(a, rank, 2)

    b, _ = initialize(tiny_llama(256, seed=1), ds_config, schedule)  # other random weights
    state = checkpoint.load(b, directory, world)
    restored = _same(_optimizer_state(b), saved)
    resumed = _epoch(b, rank, 2)
    tiny = consolidate.publish_model(b.module, None, fs, f"{out}/best", rank=rank, metadata={"epoch": 2},
                                     max_shard_bytes=TINY_SHARD)
    reference = b._zero3_consolidated_16bit_state_dict()  # DeepSpeed's own gather of the whole model
    if rank == 0:
        torch.save(reference, f"{out}/reference.pt")

    large, _ = initialize(tiny_llama(1024, seed=2, **LARGE), ds_config, schedule)
    with allocation_peak() as peak:
        written = consolidate.publish_model(large.module, None, fs, f"{out}/large", rank=rank, metadata={},
                                            max_shard_bytes=MAX_SHARD)
    dist.barrier()
    return {"epoch1": epoch1, "uninterrupted": uninterrupted, "resumed": resumed, "restored": restored,
            "state": state, "tiny": tiny, "peak": peak, "written": written}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("zero3")
    return out, run_ranks(_zero3_ranks, 2, str(out))


def test_every_rank_writes_its_own_shard_of_the_epoch_checkpoint(zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = zero3
    files = sorted(p.name for p in (out / "checkpoints" / "epoch-0001" / "deepspeed").iterdir())
    assert files == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    manifests = [json.loads((out / "checkpoints" / "epoch-0001" / "ranks" / f"rank-0000{r}.json").read_text())
                 for r in (0, 1)]
    assert all(f"zero_pp_rank_{r}_" in name for r, m in enumerate(manifests) for name in m["files"]
               if "zero_pp_rank" in name)


def test_a_resumed_run_restores_the_optimizer_exactly(zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = zero3
    assert [r["restored"] for r in ranks] == [True, True]  # master weights, Adam moments, scheduler, counters
    assert ranks[0]["state"]["epoch"] == 1


def test_the_resumed_loss_curve_is_the_uninterrupted_one(zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = zero3
    for r in ranks:
        assert r["resumed"] == r["uninterrupted"]  # bit for bit, step by step, on every rank
        assert r["uninterrupted"] != r["epoch1"]  # (the two epochs do differ)


def test_the_consolidated_checkpoint_equals_the_trained_weights(zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out, ranks = zero3
    reference = torch.load(out / "reference.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "best")  # the sharded files + index, as HF reads them
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, written once
    index = json.loads((out / "best" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f for f in ranks[0]["tiny"].files if f.startswith("model-")]
    assert json.loads((out / "best" / "kubetune_best.json").read_text())["epoch"] == 2


def test_no_shard_file_is_larger_than_the_limit_unless_one_tensor_is(zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    out, ranks = zero3
    written = ranks[0]["written"]
    sizes = [(out / "large" / f).stat().st_size for f in written.files if f.endswith(".safetensors")]
    assert len(sizes) >= 10 and written.largest_tensor_bytes < MAX_SHARD
    assert max(sizes) <= MAX_SHARD + 16 * 1024  # + the file's JSON header


def test_consolidation_memory_is_bounded_by_the_largest_shard_not_the_model(
        zero3: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = zero3
    written = ranks[0]["written"]
    # The group being gathered (never more than one file's tensors), what the previous group's all-gather
    # still holds until its handles go, gloo's staging copy of a tensor: measured <= 2.75 shards here.
    bound = 4 * written.largest_shard_bytes
    assert written.total_bytes > 2 * bound  # a whole-model copy on any rank would break the bound
    for r in ranks:
        assert r["peak"].total < bound, f"{r['peak']} over {bound}"


def test_a_checkpoint_missing_a_ranks_file_is_incomplete(zero3: tuple[Path, list[dict[str, Any]]],
                                                         tmp_path: Path) -> None:
    from kubetune.trainer import checkpoint
    from kubetune.trainer.output import local_filesystem

    out, _ = zero3
    copy = tmp_path / "epoch-0001"
    shutil.copytree(out / "checkpoints" / "epoch-0001", copy)
    fs = local_filesystem()
    assert checkpoint.missing(fs, str(copy)) == []
    shard = copy / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a rank killed while writing
    assert checkpoint.missing(fs, str(copy)) == ["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    (copy / "ranks" / "rank-00001.json").unlink()
    assert checkpoint.missing(fs, str(copy)) == ["ranks/rank-00001.json"]


def test_a_rank_fetches_only_its_own_shard_and_the_shared_files(zero3: tuple[Path, list[dict[str, Any]]],
                                                                 tmp_path: Path) -> None:
    from kubetune.trainer import checkpoint
    from kubetune.trainer.output import local_filesystem

    out, _ = zero3
    dest = checkpoint.fetch(local_filesystem(), str(out / "checkpoints" / "epoch-0001"), 1, tmp_path / "r1")
    fetched = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()
                     and not p.name.startswith("."))
    assert fetched == ["deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt",
                       "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                       "kubetune_state.json", "zero_to_fp32.py", "zero_to_torch.py"]

