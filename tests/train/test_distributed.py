"""Two CPU ranks (gloo; DDP, and FSDP2 sharding) against one rank doing both halves: disjoint packs, equal steps,
the same gradient, the same saved adapter.

With ``grad_accum=1`` on 2 ranks, optimizer step s covers the global micro-batches {2s, 2s+1}; one rank with
``grad_accum=2`` covers exactly the same ones. Since the loss of a step is Σ token losses / trainable tokens of
the whole step (all ranks), the averaged DDP gradient must equal the single-rank gradient.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

from padless.train.checkpoint import trainable_state
from padless.train.config import TrainError
from padless.train.loop import Callbacks, train

from .runs import base_config

STEPS = 2
SETTINGS = dict(max_steps=STEPS, tokens_per_micro_batch=128, lr=1e-2, eval_every=0)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``; an FSDP2 DTensor shard is gathered first (a collective, in the same order on every rank)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _instrumented_run(cfg) -> dict:
    """Train ``cfg``; return per-step losses, the token streams each forward saw, step-1 grads, final weights.

    Gradients and weights are gathered during the run: ``train`` leaves the process group it created when it
    returns, and gathering FSDP2 shards needs it."""
    seen: dict = {"inputs": [], "grads": []}

    def on_model(model):
        seen["model"] = model
        model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: seen["inputs"].append(tuple(args[0].flatten().tolist())) if module.training else None
        )

    def before_step(optimizer, args, kwargs):
        names = {id(p): n for n, p in seen["model"].named_parameters()}
        seen["grads"].append({names[id(p)]: _full(p.grad) for g in optimizer.param_groups for p in g["params"]})

    def on_step(record):
        seen["weights"] = trainable_state(seen["model"])  # a collective under FSDP2, so inside the run

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        result = train(cfg, callbacks=Callbacks(on_model=on_model, on_step=on_step))
    finally:
        handle.remove()
    return {
        "losses": result.losses,
        "steps": result.steps,
        "eval_loss": result.eval_loss,
        "inputs": seen["inputs"],
        "grads": seen["grads"][0],
        "weights": seen["weights"],
    }


def _rank_main(rank: int, world: int, port: int, shards: str, output: str, fsdp: bool = False) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    cfg = base_config(Path(shards), Path(output), grad_accum=1, fsdp=fsdp, report_to="tensorboard", **SETTINGS)
    out = _instrumented_run(cfg)
    out["group_left"] = not torch.distributed.is_initialized()  # train() created the group, so it left it
    torch.save(out, Path(output) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_gloo_ranks_equal_one_rank_doing_both_halves(synthetic_shards: Path, tmp_path: Path, wrapper: str) -> None:
    out = tmp_path / wrapper
    out.mkdir()
    args = (2, _free_port(), str(synthetic_shards), str(out), wrapper == "fsdp2")
    mp.spawn(_rank_main, args=args, nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _instrumented_run(base_config(synthetic_shards, tmp_path / "one", grad_accum=2, **SETTINGS))

    assert ranks[0]["group_left"] and ranks[1]["group_left"]
    # Equal step counts, and disjoint packs: no token stream is seen by both ranks.
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    assert len(ranks[0]["inputs"]) == len(ranks[1]["inputs"]) == STEPS
    assert not set(ranks[0]["inputs"]) & set(ranks[1]["inputs"])
    # Together the ranks saw exactly the micro-batches the single rank saw.
    assert sorted(ranks[0]["inputs"] + ranks[1]["inputs"]) == sorted(single["inputs"])
    # Same step losses (all-reduced) on both ranks and on the single rank.
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-6)
    assert ranks[1]["losses"] == ranks[0]["losses"]
    # Evaluation splits the eval packs unevenly over the ranks (no hang) and sums over all of them.
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"]
    assert ranks[0]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    # The DDP-averaged gradient equals the single-rank gradient of the same step; weights stay in sync.
    for name, g in single["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], g, rtol=1e-5, atol=1e-8, msg=name)
    for name, w in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        # Adam divides by |g| + 1e-8: where |g| ~ 1e-8 last-bit sum differences move an update a little.
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=0, atol=1e-4, msg=name)
    # The saved adapter (rank 0 writes it; under FSDP2 from the gathered shards) holds the trained weights.
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(k.replace(".weight", ".default.weight") in ranks[0]["weights"] for k in saved)
    # Only rank 0 logs to the trackers: one event file, holding the all-reduced losses.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((out / "tensorboard").iterdir())) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (s + 1, pytest.approx(loss, rel=1e-6)) for s, loss in enumerate(ranks[0]["losses"])
    ]
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, ranks[0]["weights"][key.replace(".weight", ".default.weight")], msg=key)


class _Stop(Exception):
    pass


def _resume_rank_main(rank: int, world: int, port: int, shards: str, output: str, phase: str) -> None:
    """FSDP2 on 2 gloo ranks: 'straight' (3 steps), 'stop' (checkpoint every step, stop after step 2), 'resume'."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    settings = dict(SETTINGS, max_steps=3, save_every=1, eval_every=-1)

    def stop_after_two(record):
        if record["step"] == 2:
            raise _Stop

    cfg = base_config(Path(shards), Path(output), grad_accum=1, fsdp=True, resume=phase == "resume", **settings)
    callbacks = Callbacks(on_step=stop_after_two) if phase == "stop" else Callbacks()
    try:
        result = train(cfg, callbacks=callbacks)
        if rank == 0:
            torch.save(result.losses, Path(output) / f"losses-{phase}.pt")
    except _Stop:
        pass
    # Also when the run raised: train() created the process group, so it has left it.
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_exactly(synthetic_shards: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for out, phases in ((straight, ["straight"]), (stopped, ["stop", "resume"])):
        for phase in phases:
            args = (2, _free_port(), str(synthetic_shards), str(out), phase)
            mp.spawn(_resume_rank_main, args=args, nprocs=2, join=True)
    full = torch.load(straight / "losses-straight.pt")
    resumed = torch.load(stopped / "losses-resume.pt")
    assert len(full) == 3 and len(resumed) == 1  # the resumed run did step 3 only
    assert resumed[0] == pytest.approx(full[2], rel=1e-6)
    # The saved adapters agree too (the resumed optimizer state was the straight run's, shard for shard).
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(stopped / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # A checkpoint of an FSDP2 run holds the optimizer state by parameter name: a plain run is refused before
    # loading it, naming what differs (the run is made unfinished again, so that its settings are compared).
    from padless.train.config import TrainError

    (stopped / "summary.json").unlink()
    with pytest.raises(TrainError, match=r"settings differ .*: world size 2 -> 1; --fsdp True -> False\. Resume"):
        train(base_config(synthetic_shards, stopped, resume=True, **dict(SETTINGS, max_steps=3)))


def test_mlp_tiling_is_refused_with_several_processes(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiled MLP's backward accumulates each weight's gradient once per tile, and DDP's reducer allows one per
    backward ("Expected to mark a variable ready only once" on 2 gloo ranks): refused before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match=r"^--mlp-tile-tokens with 2 processes: .*use --mlp-tile-tokens 0 or one "):
        train(base_config(synthetic_shards, tmp_path / "out", mlp_tile_tokens=64))
    assert not (tmp_path / "out").exists() and not torch.distributed.is_initialized()


def _min_rank_main(rank: int, world: int, port: int, output: str) -> None:
    from padless.train.distributed import DistEnv, destroy_process_group, init_process_group, min_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_process_group(DistEnv(rank=rank, world_size=world, local_rank=rank), torch.device("cpu"))
    try:
        torch.save(min_over_ranks(7 - 3 * rank, torch.device("cpu")), Path(output) / f"min{rank}.pt")
    finally:
        destroy_process_group()


def test_min_over_ranks_gives_every_rank_the_least_value(tmp_path: Path) -> None:
    """What --tokens-per-micro-batch auto sizes for on several ranks: the least memory of any of them."""
    from padless.train.distributed import min_over_ranks

    assert min_over_ranks(5, torch.device("cpu")) == 5  # a single process: its own value
    mp.spawn(_min_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"min{r}.pt") for r in range(2)] == [4, 4]


def test_batch_fields_carry_every_micro_batch_field() -> None:
    from padless.train.batch import MicroBatch
    from padless.train.distributed import batch_fields
    from tests.train.tiny_models import make_batch

    batch = MicroBatch(*batch_fields(make_batch([3, 4], seed=1)))
    hinted = MicroBatch(**{**batch.__dict__, "mean_seqlen": 3.5})
    again = MicroBatch(*batch_fields(hinted))  # what PackedLossModule.forward rebuilds (also under DDP)
    assert again.mean_seqlen == 3.5 and torch.equal(again.cu_seqlens, hinted.cu_seqlens)
    assert again.max_seqlen == hinted.max_seqlen and again.num_trainable == hinted.num_trainable
