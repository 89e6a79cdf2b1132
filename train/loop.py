"""``train(cfg)``: the training loop, read top to bottom.

fetch -> forward -> backward -> clip -> step -> log -> evaluate -> checkpoint. The loss of a step is
Σ token losses / trainable tokens of the WHOLE step (all micro-batches, all ranks), so the gradient does not
depend on how the step is split; the denominator comes from the host-side epoch plan, never from the device.
There is exactly one host-device sync per step (reading the loss and gradient norm, needed to stop on NaN
before the optimizer touches the weights) plus one per evaluation.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from padless.shards.reader import open_shards

from . import distributed as dist_util
from .checkpoint import Position, latest_checkpoint, load_checkpoint, read_checkpoint_step, save_checkpoint
from .config import TrainConfig, TrainError
from .cuda_graph import GraphCaptureError, GraphedMicroStep
from .data import Prefetcher, pack_sizes, plan_epoch, step_sum
from .evaluate import default_eval_shards, evaluate
from .host_gc import frozen_gc
from .host_vocab import keep_vocab_on_host
from .memory_breakdown import ForwardMemory, breakdown, persistent_bytes
from .memory_setting import resolve_low_memory_checkpointing, resolve_memory_setting
from .metrics import MetricsLog, flop_model, peak_flops, peak_memory_gib, sum_squared_lengths
from .offload_budget import GIB, check_run_host_memory, keeps_vocab_on_host, vocab_params_of
from .optim import build_optimizer, build_scheduler, check_optimizer, reapply_hyperparameters
from .output import gather_output_state, save_base_model, save_output, tokenizer_folder
from .prepare import (
    build_model,
    check_data,
    check_eval_tokenizer,
    check_positions,
    check_token_ids,
    check_tokenizer,
    model_overrides_file,
    resolve_device,
    resolve_dtype,
)
from .progress import Progress, library_progress_bars
from .run_folder import apply_output_plan, plan_output, record_outputs, run_settings, save_run_config
from .trackers import check_installed, start_trackers

__all__ = ["Callbacks", "NonFiniteLossError", "TrainResult", "train"]

_OOM = getattr(torch.cuda, "OutOfMemoryError", torch.OutOfMemoryError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN/inf; training stopped before the optimizer step."""


@dataclass
class Callbacks:
    """Hooks for tests and tools: ``on_model(model)`` once the model is built (adapted, patched, unwrapped);
    ``on_step(record)`` after each step's log and checkpoint."""

    on_model: Callable[[torch.nn.Module], None] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    """What a run produced (also written to ``OUTPUT/summary.json``)."""

    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# A random base bigger than this (a benchmark shape from --model-overrides) is not saved: gigabytes of noise.
_SAVE_BASE_LIMIT = 1_000_000_000


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_output() -> Path:
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def train(cfg: TrainConfig, *, callbacks: Callbacks | None = None) -> TrainResult:
    """Run ``cfg`` to the end; return the losses, eval loss and summary. Raises :class:`TrainError` subclasses.

    Under torchrun it joins the process group and, when it created the group, leaves it again at the end, also
    when the run fails (a group that the calling program set up stays up).
    """
    env = dist_util.detect()
    if cfg.mlp_tile_tokens and env.distributed:
        raise TrainError(
            f"--mlp-tile-tokens with {env.world_size} processes: the tiled MLP's backward accumulates each weight's "
            "gradient once per tile, and DDP's gradient hooks expect one; use --mlp-tile-tokens 0 or one process"
        )
    device = resolve_device(cfg, env)
    cfg = resolve_memory_setting(cfg, device, env.world_size)
    check_optimizer(cfg, device)
    dtype = resolve_dtype(cfg, device)
    owns_group = dist_util.init_process_group(env, device)
    try:
        with library_progress_bars(cfg.progress):
            return _train(cfg, callbacks or Callbacks(), env, device, dtype)
    except OSError as error:
        if error.errno not in (*_DISK_FULL, *_NO_ACCESS):
            raise
        fix = (
            "free disk space and run again (with --resume to continue from the last checkpoint)"
            if error.errno in _DISK_FULL
            else "choose an --output you may write to"
        )
        where = str(error.filename or cfg.output or "the output")
        raise TrainError(f"cannot write {where!r} ({error.strerror}); {fix}") from error
    finally:
        if owns_group:
            dist_util.destroy_process_group()


def _train(
    cfg: TrainConfig, callbacks: Callbacks, env: dist_util.DistEnv, device: torch.device, dtype: torch.dtype
) -> TrainResult:
    """The run itself, in one process of ``env`` (its process group, if any, is up)."""
    output = Path(cfg.output) if cfg.output else _default_output()
    result = TrainResult(output=output, steps=0)
    check_installed(cfg.report_to_list)  # every rank, before any work: a missing tracker library is one error

    # Data: the shard sets and the per-pack sizes every plan is made from (host-side, read once), checked before
    # any model is loaded: something to learn, and every pack within the micro-batch budget.
    ss = open_shards(cfg.shards)
    eval_path = cfg.eval_shards or default_eval_shards(cfg.shards)
    if eval_path is None and cfg.eval_every > 0:
        raise TrainError(
            f"--eval-every {cfg.eval_every} needs an eval set, and {cfg.shards!r} has none ({cfg.shards}/eval holds no "
            "manifest.json): pass --eval-shards, re-run `prep pack` with --eval-fraction, or leave out --eval-every"
        )
    eval_ss = open_shards(eval_path) if eval_path is not None and cfg.eval_every >= 0 else None
    sizes = pack_sizes(ss)
    budget, eval_sizes = check_data(cfg, ss, sizes, eval_ss)
    if eval_ss is not None:
        result.warnings += check_eval_tokenizer(ss.manifest, eval_ss, force=cfg.force)
    auto = None
    if cfg.tokens_per_micro_batch == "auto":  # the budget `train plan` predicts fits (train.auto_batch)
        from .auto_batch import auto_budget

        agree = functools.partial(dist_util.min_over_ranks, device=device)
        auto = auto_budget(cfg, output, device, dtype.itemsize, agree=agree)
        budget = auto.tokens
    cfg = resolve_low_memory_checkpointing(cfg, budget)  # --memory low offloads only long micro-batches
    plan_for = functools.lru_cache(maxsize=2)(
        lambda epoch: plan_epoch(
            ss.order(cfg.seed, epoch),
            sizes.num_tokens,
            epoch=epoch,
            budget=budget,
            world_size=env.world_size,
            grad_accum=cfg.grad_accum,
        )
    )
    if plan_for(0).steps == 0:
        raise TrainError(
            f"{cfg.shards!r} holds {len(ss)} packs: too few for {env.world_size} ranks; pack more data or use "
            "fewer ranks"
        )
    total_steps = cfg.max_steps or sum(plan_for(e).steps for e in range(cfg.epochs))

    # Output: what this run may write, replace or continue (see train.run_folder); nothing is touched yet.
    settings = run_settings(
        cfg, world_size=env.world_size, budget=budget, manifest=ss.manifest, dtype=_DTYPE_NAMES[dtype]
    )
    inputs = [("shard set", cfg.shards), ("eval set", str(eval_path) if eval_path else None), ("model", cfg.model),
              ("--model-overrides file", model_overrides_file(cfg.model_overrides))]  # fmt: skip
    out_plan = plan_output(cfg, output, settings, inputs=inputs)
    resume_from = out_plan.checkpoint
    if resume_from is not None:
        _check_resume_length(resume_from, total_steps)
    dist_util.barrier()  # every rank has read the folder before rank 0 changes it

    # Model: load (or build the tiny one), check the tokenizer, add adapters, patch in the packed path.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ss.manifest, device, dtype)
    result.warnings += check_tokenizer(ss.manifest, cfg.model, model, force=cfg.force, max_token_id=sizes.max_token_id)
    result.warnings += check_positions(sizes.max_seqlen, model, f"the shard set {cfg.shards!r}")
    if eval_ss is not None and eval_sizes is not None:
        check_token_ids(eval_sizes.max_token_id, model, f"eval set {str(eval_ss.path)!r}")
        result.warnings += check_positions(eval_sizes.max_seqlen, model, f"eval set {str(eval_ss.path)!r}")
    from .adapters import apply_adapters, check_targets

    if cfg.mode != "full":
        check_targets(model, cfg.target_module_list)  # before anything is written to --output
    # the host holds the offloaded checkpoints and --memory low's vocabulary (moved there below, counted here)
    vocab_params = vocab_params_of(model) if keeps_vocab_on_host(cfg.memory, cfg.mode) else ()
    check_run_host_memory(cfg, model.config, dtype, budget, device=device, vocab_params=vocab_params)
    tokenizer_from, no_tokenizer = tokenizer_folder(cfg.model, ss.manifest)  # copied next to the output
    result.warnings += [no_tokenizer] if no_tokenizer else []
    if env.is_main:  # the first write: clear what the plan replaces, mark the folder as a padless run
        apply_output_plan(out_plan)
        save_run_config(cfg, out_plan)  # OUTPUT/config.yaml replays the run, an interrupted one too
    dist_util.barrier()
    if cfg.model is None and cfg.mode != "full" and env.is_main and _param_count(model) < _SAVE_BASE_LIMIT:
        save_base_model(model, output / "base_model")  # the adapter needs its random base to be reloadable
    from .model_patch import patch_model

    model = apply_adapters(
        model,
        mode=cfg.mode,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.target_module_list,
    )
    patch_model(model)
    if cfg.memory == "low":
        keep_vocab_on_host(model)
    model.train()
    if callbacks.on_model:
        callbacks.on_model(model)
    from .packed_forward import packed_loss  # the model path (imported late: it pulls in transformers and peft)

    loss_fn = functools.partial(packed_loss, **_checkpoint_options(cfg))
    wrapped = dist_util.wrap_model(dist_util.PackedLossModule(model, loss_fn), env, device, fsdp=cfg.fsdp)
    # Evaluation runs no backward: DDP's wrapper is bypassed (ranks may run different numbers of eval batches);
    # FSDP2 must go through its wrapper, whose hooks gather the sharded weights.
    eval_module = wrapped.module if hasattr(wrapped, "no_sync") else wrapped
    eval_loss_fn = lambda _model, batch: eval_module.run(batch)

    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops = flop_model(
        model,
        full=cfg.mode == "full",
        checkpointing=cfg.checkpointing,
        keep_attention=cfg.keep_attention,
        checkpoint_layers=cfg.checkpoint_layers,
    )
    peak = peak_flops(device)

    # Resume: weights, optimizer, scheduler, RNG and the data position of the latest checkpoint.
    position = Position(step=0, epoch=0, micro_batch=0)
    if resume_from is not None:
        position = load_checkpoint(resume_from, model, optimizer, scheduler, rank=env.rank)
        if out_plan.changed:  # --resume-changed: the new lr / weight decay / schedule replace the loaded ones
            reapply_hyperparameters(optimizer, scheduler, cfg)
    metrics = MetricsLog(
        output / "metrics.jsonl", enabled=env.is_main, keep_until_step=position.step if resume_from else None
    )
    progress = Progress(
        total=total_steps,
        initial=position.step,
        enabled=cfg.progress and env.is_main,
        every=cfg.log_every,
        main=env.is_main,
    )
    for note in ([auto.note] if auto else []) + out_plan.notes:
        progress.write(note, always=True)
    for warning in result.warnings:
        progress.write(f"warning: {warning}", always=True)

    def checkpoint(pos: Position) -> None:
        save_checkpoint(output, pos, model, optimizer, scheduler, cfg, rank=env.rank, barrier=dist_util.barrier,
                        settings=settings)  # fmt: skip

    def run_eval(step: int) -> None:
        loss, count = evaluate(
            eval_loss_fn,
            model,
            eval_ss,
            device=device,
            budget=budget,
            rank=env.rank,
            world_size=env.world_size,
            all_reduce=dist_util.all_reduce_sum,
        )
        result.eval_loss = loss
        metrics.write({"step": step, "eval_loss": loss, "eval_trainable_tokens": count})
        progress.write(f"step {step}: eval_loss {loss:.4f} over {count} trainable tokens")

    # The saved line of the summary's breakdown: not under FSDP2, whose root group stays gathered after the forward.
    forward_memory = ForwardMemory(device, enabled=not cfg.fsdp)
    graph_step = _graph_step(
        cfg, env, device, model, trainable, ss, sizes, budget, plan_for, total_steps, progress, forward_memory
    )
    # --report-to (rank 0): every metrics.jsonl record also goes to the trackers, the resolved config once
    hyperparameters = {**asdict(cfg), "output": str(output), "dtype": settings["dtype"], "device": str(device),
                       "world_size": env.world_size, "tokens_per_micro_batch": budget}  # fmt: skip
    trackers = start_trackers(
        cfg.report_to_list if env.is_main else (),
        output,
        hyperparameters=hyperparameters,
        resume_step=position.step if resume_from else None,
    )
    metrics.sinks.append(trackers.log)
    step, epoch, start = position.step, position.epoch, position.micro_batch
    wall0, tokens_seen, trainable_seen = time.perf_counter(), 0, 0
    step_times: list[float] = []
    per_step: list[tuple[int, int, float]] = []  # (tokens, trainable tokens, FLOPs) of each step, all ranks
    persistent: dict[str, int] | None = None
    first_step = step  # its forwards also make what persists: left out of the saved line
    with frozen_gc():  # no full GC pass over the model's objects in the middle of a step
        try:
            while step < total_steps:
                plan = plan_for(epoch)
                if plan.dropped and start == 0 and env.is_main:
                    progress.write(f"note: {plan.describe_dropped()}", always=True)
                mine = plan.ranks[env.rank]
                with Prefetcher(ss, mine, start=start, pin=device.type == "cuda") as feed:
                    batches = iter(feed)
                    for s in range(start // cfg.grad_accum, plan.steps):
                        if step >= total_steps:
                            break
                        t0 = time.perf_counter()
                        window = plan.step_slice(s)
                        n_step = step_sum(plan, s, sizes.num_trainable)  # all ranks, from the host plan
                        scale = env.world_size / max(n_step, 1)  # DDP averages over ranks; undo that, divide by N
                        step_loss = torch.zeros((), dtype=torch.float32, device=device)
                        step_tokens = step_sq = 0
                        for k in range(window.start, window.stop):
                            # fetch: the worker already concatenated (and pinned) it; the copy does not block the host
                            _, host_batch = next(batches)
                            step_tokens += host_batch.num_tokens
                            step_sq += sum_squared_lengths(host_batch.cu_seqlens)
                            loss_sum = None
                            if graph_step is not None:  # the same forward + backward, replayed as one CUDA graph
                                try:
                                    loss_sum = graph_step(host_batch, scale)
                                except GraphCaptureError as error:
                                    if cfg.cuda_graphs == "on":
                                        raise TrainError(str(error)) from error
                                    graph_step = None
                                    result.warnings.append(f"CUDA graphs off: {error}")
                                    progress.write(f"warning: {result.warnings[-1]}", always=True)
                            if loss_sum is None:
                                batch = host_batch.to(device, non_blocking=True)
                                with dist_util.no_sync(wrapped, skip=k < window.stop - 1):
                                    # forward: Σ token losses of this micro-batch (logits never materialised)
                                    with forward_memory.forward(measure=step > first_step):
                                        loss_sum, _ = wrapped.run(batch)
                                    # backward: scaled so the step's gradient is that of the step's token mean
                                    (loss_sum * scale).backward()
                            step_loss += loss_sum.detach().float()

                        # clip: the global gradient norm (also logged; inf = measure without clipping)
                        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
                        if hasattr(grad_norm, "full_tensor"):
                            grad_norm = grad_norm.full_tensor()
                        if env.distributed:
                            dist_util.all_reduce_sum(step_loss)
                        # host-device sync (one per step): the loss and norm decide whether the weights may change
                        loss_total, norm = torch.stack([step_loss, grad_norm.float().to(device)]).tolist()
                        loss = loss_total / n_step if n_step else 0.0
                        if not (math.isfinite(loss) and math.isfinite(norm)):
                            raise NonFiniteLossError(_nan_message(step + 1, loss, norm, output))

                        # step: update the weights, advance the schedule, drop the gradients
                        lr = scheduler.get_last_lr()[0]
                        optimizer.step()
                        if persistent is None:  # gradients and optimizer state exist now: count them once
                            persistent = persistent_bytes(model, optimizer, device)
                        scheduler.step()
                        # a captured graph accumulates into the existing .grad tensors: zero them, never drop them
                        optimizer.zero_grad(set_to_none=graph_step is None)
                        step += 1
                        done_epoch = window.stop >= plan.micro_batches_per_rank
                        position = Position(
                            step=step,
                            epoch=epoch + 1 if done_epoch else epoch,
                            micro_batch=0 if done_epoch else window.stop,
                        )

                        # log: one metrics.jsonl line per step, the bar every --log-every steps
                        dt = time.perf_counter() - t0
                        step_tokens_all = step_sum(plan, s, sizes.num_tokens)  # all ranks
                        record = {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": norm,
                            "tokens": step_tokens_all,
                            "trainable_tokens": n_step,
                            "tokens_per_s": step_tokens_all / dt,
                            "trainable_tokens_per_s": n_step / dt,
                            "mfu": flops.step_flops(step_tokens, step_sq) / dt / peak if peak else None,
                            "peak_mem_gib": peak_memory_gib(device),
                            "step_time_s": dt,
                        }
                        metrics.write(record)
                        progress.update(record)
                        result.losses.append(loss)
                        tokens_seen += step_tokens_all
                        trainable_seen += n_step
                        step_times.append(dt)
                        step_flops = flops.step_flops(step_tokens, step_sq) * env.world_size
                        per_step.append((step_tokens_all, n_step, step_flops))

                        # evaluate: every --eval-every steps and after the last one
                        if eval_ss is not None and (
                            step == total_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                        ):
                            run_eval(step)

                        # checkpoint: every --save-every steps (atomic; 'latest' moves only once it is whole)
                        if cfg.save_every and step % cfg.save_every == 0:
                            checkpoint(position)
                        if callbacks.on_step:
                            callbacks.on_step(record)
                epoch, start = epoch + 1, 0
        except _OOM as error:
            raise TrainError(
                f"CUDA out of memory at step {step + 1} ({str(error).splitlines()[0]}). Lower --tokens-per-micro-batch "
                f"(now {budget}), turn on --checkpointing on (or offload), or use --qlora to store the base in 4 bits"
            ) from error
        finally:
            progress.close()
            trackers.close()

    # Output: the adapter (peft) or the full model (Hugging Face), then the summary.
    wall = time.perf_counter() - wall0
    result.steps = step
    if not result.losses and result.eval_loss is None:
        # A resume whose checkpoint is at the run's last step trains nothing: its eval loss is the one logged last.
        result.eval_loss = metrics.last_value("eval_loss")
    final_state = gather_output_state(model)  # FSDP2: a collective on every rank; None otherwise
    if env.is_main:
        record = functools.partial(record_outputs, output)
        save_output(model, output, model_source=cfg.model, tokenizer_from=tokenizer_from, state_dict=final_state,
                    record=record)  # fmt: skip
    first = 1 if len(step_times) > 1 else 0
    steady, steady_times = per_step[first:], step_times[first:]
    result.summary = {
        "steps": step,
        # A resume whose checkpoint is at the run's last step trains nothing: its last loss is the checkpoint's.
        "final_loss": result.losses[-1] if result.losses else metrics.last_value("loss"),
        "eval_loss": result.eval_loss,
        "tokens": tokens_seen,
        "trainable_tokens": trainable_seen,
        "wall_s": wall,
        "tokens_per_s": tokens_seen / wall if wall > 0 else None,
        "trainable_tokens_per_s": trainable_seen / wall if wall > 0 else None,
        "peak_mem_gib": peak_memory_gib(device),
        "tokens_per_micro_batch": budget,
        "predicted_peak_gib": auto.predicted_peak / 2**30 if auto and auto.predicted_peak is not None else None,
        "memory_gib": breakdown(persistent or persistent_bytes(model, optimizer, device), device, forward_memory.most),
        "train_time_s": sum(step_times),
        # Steady state: step time only (no start-up, evaluation or saving) and, when there are several steps,
        # without the first, which pays the kernel compiles and the CUDA-graph capture.
        "steady_steps": len(steady_times),
        "steady_tokens_per_s": sum(x[0] for x in steady) / sum(steady_times) if steady_times else None,
        "steady_trainable_tokens_per_s": sum(x[1] for x in steady) / sum(steady_times) if steady_times else None,
        "mfu": sum(x[2] for x in steady) / sum(steady_times) / (peak * env.world_size)
        if peak and steady_times
        else None,
        "matmul_params": flops.matmul_params,
        "cuda_graphs": graph_step is not None,  # the steps ran as CUDA graphs (to the end of the run)
        "warnings": list(result.warnings),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "output": str(output),
        "config": asdict(cfg),
    }
    if env.is_main:
        (output / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")
        from .report import write_report  # matplotlib: imported only here

        write_report(output)  # report.png and report.txt, from metrics.jsonl (`train report` writes them again)
    dist_util.barrier()
    return result


def _graph_step(cfg, env, device, model, trainable, ss, sizes, budget, plan_for, total_steps, progress, forward_memory):
    """The CUDA-graph micro-step for this run, or None (eager): see ``--cuda-graphs`` and train.cuda_graph."""
    from .model_patch import get_patch
    from .packed_forward import packed_loss
    from .static_batch import static_shape

    blockers = [
        (device.type != "cuda", f"device {device} is not CUDA"),
        (env.distributed, "several processes (DDP/FSDP hooks are not captured)"),
        (cfg.checkpointing == "offload", "--checkpointing offload allocates pinned host memory"),
        (cfg.checkpoint_layers > 1, "--checkpoint-layers nests checkpoints, which padless does not capture"),
        (cfg.lora_dropout > 0 and cfg.mode != "full", "--lora-dropout > 0 draws random numbers"),
        (get_patch(model) is None or get_patch(model).fallback, "the architecture takes the unpatched fallback path"),
    ]
    reasons = [why for blocked, why in blockers if blocked]
    if cfg.cuda_graphs == "off" or (cfg.cuda_graphs == "auto" and reasons):
        return None
    if reasons:
        raise TrainError(f"--cuda-graphs on is not possible here: {'; '.join(reasons)}. Use --cuda-graphs auto/off")
    plans, steps = [], 0
    while steps < total_steps:  # every epoch the run will touch: the static shape must hold all micro-batches
        plans.append(plan_for(len(plans)))
        steps += plans[-1].steps
    mean = float(sizes.num_tokens.sum()) / max(int(sizes.num_examples.sum()), 1)  # attention's tiling hint
    shape = static_shape(budget, sizes.max_examples(plans), ss.max_len, mean, sizes.max_trainable(plans))
    loss_fn = functools.partial(packed_loss, model, **_checkpoint_options(cfg), preserve_rng_state=False)
    return GraphedMicroStep(lambda batch: loss_fn(batch), trainable, shape, device, forward_memory=forward_memory)


def _checkpoint_options(cfg: TrainConfig) -> dict[str, Any]:
    """``packed_loss``'s activation-memory arguments from the run's options."""
    return {
        "checkpointing": cfg.checkpointing,
        "checkpoint_gpu_bytes": int(cfg.checkpoint_gpu_gib * GIB),
        "keep_attention": cfg.keep_attention,
        "mlp_tile_tokens": cfg.mlp_tile_tokens,
        "checkpoint_layers": cfg.checkpoint_layers,
    }


def _check_resume_length(checkpoint: Path, total_steps: int) -> None:
    """A resumed run must not end before its checkpoint: a shorter --max-steps or --epochs would train nothing and
    save the checkpoint's weights as if the run had ended at its new length."""
    done = read_checkpoint_step(checkpoint)
    if done > total_steps:
        raise TrainError(
            f"--resume: checkpoint {checkpoint.name} is at step {done}, past this run's last step {total_steps} (from "
            f"--max-steps / --epochs); resume with --max-steps {done} or more, or choose a new --output"
        )


def _nan_message(step: int, loss: float, norm: float, output: Path) -> str:
    ckpt = latest_checkpoint(output)
    kept = (
        f"the last good checkpoint {str(ckpt)!r} is kept (continue from it with --resume)"
        if ckpt is not None
        else "no checkpoint had been written (use --save-every N to keep one)"
    )
    return (
        f"training stopped at step {step}: loss {loss} / gradient norm {norm} is not finite; the weights were not "
        f"updated and {kept}. Try a lower --lr, more --warmup-steps or --dtype fp32"
    )
