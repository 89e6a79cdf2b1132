"""The systems ``tools/bench_train.py`` compares, and the one timed training loop they all run through.

Each system builds the same randomly initialised model (same config, same seed, so bit-identical base weights),
adds LoRA r 16 / alpha 16 / dropout 0 on q,k,v,o,gate,up,down (LoRA drawn from the same seed), and runs the same
loop: per step, every micro-batch's forward + backward (loss = token-loss sum / the step's trainable tokens),
grad-norm clip 1.0, AdamW lr 2e-4, with ``torch.cuda.synchronize()`` before and after the step. Only the model
path differs:

* ``hf``: transformers + peft, gradient checkpointing (non-reentrant), padded batches (attention_mask, labels -100
  on padding) or packed rows (position_ids restarting per example, no attention_mask, use_cache=False: transformers
  then builds the block-diagonal mask itself: a dense T x T mask for SDPA, a BlockMask for FlexAttention);
* ``liger``: the same plus Liger-Kernel (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) on the instance;
* ``padless``: ``train.adapters.apply_adapters`` + ``train.model_patch.patch_model`` and
  ``train.packed_forward.packed_loss(model, batch, checkpointing="on")`` on ``train.batch.concat_packs``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from bench_train_data import HostBatch, Step, make_example_steps, make_steps, packed_rows, padded_batches

__all__ = ["SHAPES", "BenchConfig", "SystemSpec", "flops_per_token", "model_config", "run_system"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (model_type, config kwargs). Untied embeddings; use_cache off (training only).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-8b": (
        "qwen3",
        dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             intermediate_size=12288, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
             max_position_embeddings=40960),
    ),
    "llama3-8b": (
        "llama",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             intermediate_size=14336, vocab_size=128256, rope_theta=5e5, rms_norm_eps=1e-5,
             max_position_embeddings=8192),
    ),
}  # fmt: skip
# --tiny: head_dim 64 because padless's GPU kernels take D in {64, 80, 96, 128, 256} (a --tiny run on a GPU works)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=128)  # fmt: skip


@dataclass(kw_only=True, frozen=True)
class BenchConfig:
    """What every system of one run shares (written to JSON for the worker processes)."""

    shards: str
    model_shape: str
    tiny: bool
    seed: int
    lr: float
    out: str
    profile: str  # comma-separated globs of the padless systems to profile ("" = none)
    peak_tflops: float
    flex_pad_rows: bool
    padded_steps: str  # "examples": b examples per step (one micro-batch) | "plan": padless's plan steps
    deadline: float  # time.time() after which systems not yet started are skipped (0: none)


@dataclass(kw_only=True, frozen=True)
class SystemSpec:
    """One row of the table."""

    name: str
    family: str  # "hf" | "liger" | "padless" | "unsloth"
    layout: str  # "padded" | "packed" | "stream"
    attn: str  # "sdpa" | "flex_attention" | "padless"
    plan_tokens: int  # token budget of the step plan (see bench_train_data)
    batch_size: int = 0  # padded examples per micro-batch
    warmup: int = 3
    steps: int = 10
    group: str = "main"  # worker process: liger patches module globals, so it gets its own
    needs_cuda: bool = False
    optional: bool = False  # left out of --systems default (the ~8-minute line-up); '*' runs it
    checkpointing: str = "on"  # padless only: "on" (recompute) or "offload" (checkpointed inputs in pinned host memory)
    cuda_graphs: bool = True  # padless only (CUDA): each micro-batch's forward+backward replayed as one CUDA graph


def model_config(shape: str, vocab: int | None, *, tiny: bool) -> tuple[Any, list[str]]:
    """The transformers config of ``shape`` (tiny: 2 layers, hidden 64), sized to hold the shards' vocabulary."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"--model-shape {shape!r}: expected one of {sorted(SHAPES)}")
    model_type, kwargs = SHAPES[shape]
    kwargs = dict(kwargs, **(TINY if tiny else {}))
    notes = []
    if tiny and vocab:
        kwargs["vocab_size"] = vocab
    elif vocab and vocab > kwargs["vocab_size"]:
        notes.append(
            f"vocab_size raised from {kwargs['vocab_size']} to {vocab} to hold the shards' tokenizer "
            "(build the shards with the model's own tokenizer to keep the exact shape)"
        )
        kwargs["vocab_size"] = -(-vocab // 64) * 64
    cfg = AutoConfig.for_model(model_type, tie_word_embeddings=False, use_cache=False, attention_dropout=0.0, **kwargs)
    return cfg, notes


def flops_per_token(cfg: Any) -> tuple[float, float]:
    """(FLOPs per token, FLOPs per squared example length) of one LoRA step with recomputation.

    Decoder matmuls: forward 2N, activation gradients 2N, recompute 2N (checkpointing) = 6N; the head 2N + 2N (not
    recomputed); frozen weights get no weight gradient, LoRA's own matmuls (~0.3%) are not counted. Attention per
    layer and example of length L: 2·L²·H·D forward (causal), twice that backward, once more recomputed.
    """
    e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = e * (h * d) * 2 + e * (kv * d) * 2 + 3 * e * cfg.intermediate_size
    n_layers = per_layer * cfg.num_hidden_layers
    n_head = e * cfg.vocab_size
    return 6.0 * n_layers + 4.0 * n_head, 2.0 * cfg.num_hidden_layers * h * d * 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _build_model(cfg: Any, attn: str, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Random init directly on the device (no CPU init, no copy): the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model


def _apply_liger(model: Any) -> None:
    module = importlib.import_module("liger_kernel.transformers")
    fn = getattr(module, f"apply_liger_kernel_to_{model.config.model_type}")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)


def _peft_lora(model: Any, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _hf_loss_fn(model: Any, device: torch.device) -> Callable[[HostBatch, int], tuple[torch.Tensor, int]]:
    def run(batch: HostBatch, n_step: int) -> tuple[torch.Tensor, int]:
        # num_items_in_batch: the loss is the token-loss sum / the whole step's trainable tokens
        out = model(**batch.to(device), use_cache=False, num_items_in_batch=n_step)
        return out.loss, batch.real_tokens

    return run


def hf_unpacked_loss(model: Any, step: Step, device: torch.device) -> float:
    """Hugging Face's loss on the step's examples unpacked (padded batches sorted by length), no gradient."""
    n_step = step.num_trainable
    order = sorted(step.examples, key=lambda e: len(e.input_ids))
    total = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in padded_batches(order, 16):
            total += float(model(**b.to(device), use_cache=False, num_items_in_batch=n_step).loss)
    model.train(was_training)
    return total


def _padless_adapters(model: Any) -> Any:
    """padless's LoRA (``train.adapters.apply_adapters``, the trainer's own call)."""
    from padless.train.adapters import apply_adapters

    wrapped = apply_adapters(model, mode="lora", r=16, alpha=16, dropout=0.0, target_modules=LORA_TARGETS)
    return wrapped if wrapped is not None else model


def _padless_loss_fn(
    model: Any, device: torch.device, checkpointing: str = "on"
) -> Callable[[Any, int], tuple[torch.Tensor, int]]:
    """``patch_model`` + ``packed_loss`` (the contracts of docs/DESIGN.md), as the trainer's loop calls them."""
    from padless.train.model_patch import patch_model
    from padless.train.packed_forward import packed_loss

    patch_model(model)
    kw = {"checkpointing": checkpointing} if "checkpointing" in inspect.signature(packed_loss).parameters else {}

    def run(host: Any, n_step: int) -> tuple[torch.Tensor, int]:
        loss_sum, _ = packed_loss(model, host.to(device, non_blocking=True), **kw)
        return loss_sum / n_step, host.num_tokens

    return run


def _padless_graph_fn(
    model: Any, device: torch.device, checkpointing: str, batches: list[list[Any]], max_len: int, params: list
) -> Callable[[Any, int], tuple[torch.Tensor, int]]:
    """The trainer's CUDA-graph micro-step (``train.cuda_graph``): forward AND backward in one replay, padded to
    one static shape that holds every micro-batch of the run."""
    from padless.train.cuda_graph import GraphedMicroStep
    from padless.train.model_patch import patch_model
    from padless.train.packed_forward import packed_loss
    from padless.train.static_batch import static_shape

    patch_model(model)
    mbs = [b for step in batches for b in step]
    mean = sum(b.num_tokens for b in mbs) / sum(b.num_examples for b in mbs)  # attention's tiling hint
    max_trainable = max(b.num_trainable for b in mbs)  # the captured loss runs on that many rows
    shape = static_shape(max(b.num_tokens for b in mbs), max(b.num_examples for b in mbs), max_len, mean, max_trainable)
    step = GraphedMicroStep(
        lambda b: packed_loss(model, b, checkpointing=checkpointing, preserve_rng_state=False), params, shape, device
    )

    def run(host: Any, n_step: int) -> tuple[torch.Tensor, int]:
        return step(host, 1.0 / n_step) / n_step, host.num_tokens

    run.backward_done = True  # type: ignore[attr-defined]
    run.static_shape = shape  # type: ignore[attr-defined]
    return run


def _micro_batches(spec: SystemSpec, steps: list[Step], cfg: BenchConfig, pin: bool) -> list[list[Any]]:
    if spec.layout == "padded":
        out = [padded_batches(s.examples, spec.batch_size) for s in steps]
    elif spec.layout == "packed":
        pad = spec.plan_tokens if spec.attn == "flex_attention" and cfg.flex_pad_rows else None
        out = [packed_rows(s, pad_to=pad) for s in steps]
    else:
        from padless.train.batch import concat_packs

        out = [[concat_packs(s.packs)] for s in steps]
    if pin:
        out = [[_pin(b) for b in mbs] for mbs in out]
    return out


def _pin(b: Any) -> Any:
    if isinstance(b, HostBatch):
        return HostBatch({k: v.pin_memory() for k, v in b.kwargs.items()}, b.real_tokens, b.padded_tokens)
    return b.pin_memory()


def _alloc_retries(device) -> int:
    """The CUDA caching allocator's count of failed allocations that freed its cache and retried (each one syncs
    the device and returns memory to the driver: a slow step with this count going up is allocator-bound)."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


class _GcClock:
    """Seconds the cyclic garbage collector ran, through ``gc.callbacks`` (a pause in an eager step shows here)."""

    def __init__(self) -> None:
        self.total, self._t0 = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _frozen_gc():
    from padless.train.host_gc import frozen_gc

    return frozen_gc()


def _timed_loop(model, run, batches, steps, device, params, opt, profile_dir: Path | None, gc_stats=None):
    """Train every step; (losses, step seconds, grad norms, allocator retries per step). ``gc_stats``: a list that
    receives the garbage collector's seconds in each step."""
    with _GcClock() as clock:
        return _timed_steps(model, run, batches, steps, device, params, opt, profile_dir, clock, gc_stats)


def _timed_steps(model, run, batches, steps, device, params, opt, profile_dir, clock, gc_stats):
    losses, times, norms, retries = [], [], [], []
    graphed = getattr(run, "backward_done", False)
    for k, (mbs, step) in enumerate(zip(batches, steps)):
        n_step = step.num_trainable
        _sync(device)
        before, gc_before = _alloc_retries(device), clock.total
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for mb in mbs:
            loss, _ = run(mb, n_step)
            if not graphed:
                loss.backward()
            total += loss.detach().float()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not graphed)  # a CUDA graph accumulates into the existing .grad tensors
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(total))
        norms.append(float(norm))
        retries.append(_alloc_retries(device) - before)
        gc_s = clock.total - gc_before
        if gc_stats is not None:
            gc_stats.append(gc_s)
        note = f"  ({retries[-1]} allocator retries)" if retries[-1] else ""
        note += f"  (gc {gc_s:.3f} s)" if gc_s >= 0.01 else ""
        print(f"    step {k + 1:3d}  loss {losses[-1]:.4f}  {times[-1]:.3f} s{note}", flush=True)
    if profile_dir is not None:
        _profile_step(run, batches[-1], steps[-1], device, params, opt, profile_dir)
    return losses, times, norms, retries


def _profile_step(run, mbs, step, device, params, opt, profile_dir: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for mb in mbs:
            loss, _ = run(mb, step.num_trainable)
            if not getattr(run, "backward_done", False):
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not getattr(run, "backward_done", False))
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # torch >= 2.4 names
    profile_dir.mkdir(parents=True, exist_ok=True)
    (profile_dir / "top_kernels.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    prof.export_chrome_trace(str(profile_dir / "trace.json.gz"))


def run_system(cfg: BenchConfig, spec: SystemSpec, ss: Any) -> dict[str, Any]:
    """Build, train and time one system; returns its result row (never raises for an OOM: status says it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row: dict[str, Any] = {"system": spec.name, "spec": asdict(spec), "status": "ok"}
    row["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if spec.needs_cuda and device.type != "cuda":
        return {**row, "status": "skipped (cpu)"}
    if cfg.deadline and time.time() > cfg.deadline:
        return {**row, "status": "skipped (--time-budget spent)"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        os.environ.setdefault("PADLESS_KERNELS", "reference")
    from bench_train_data import shards_vocab_size

    mcfg, notes = model_config(cfg.model_shape, shards_vocab_size(ss), tiny=cfg.tiny)
    count = spec.warmup + spec.steps
    if spec.layout == "padded" and cfg.padded_steps == "examples":
        steps = make_example_steps(ss, seed=cfg.seed, per_step=spec.batch_size, count=count)
        row["plan"] = f"{spec.batch_size} ex"
    else:
        steps = make_steps(ss, seed=cfg.seed, budget=spec.plan_tokens, count=count)
        row["plan"] = f"{spec.plan_tokens} tok"
    batches = _micro_batches(spec, steps, cfg, pin=device.type == "cuda")
    try:
        _free(device)
        t0 = time.perf_counter()
        attn = "sdpa" if spec.attn == "padless" else spec.attn
        model = _build_model(mcfg, attn, device, dtype, cfg.seed)
        row["build_s"] = time.perf_counter() - t0
        if spec.family == "liger":
            _apply_liger(model)
        if spec.family == "padless":
            torch.manual_seed(cfg.seed + 1)
            model = _padless_adapters(model)
            # Hugging Face's own loss on step 1's examples, unpacked, before padless patches the instance
            row["hf_unpacked_loss_step1"] = hf_unpacked_loss(model, steps[0], device)
        else:
            model = _peft_lora(model, cfg.seed)
            run = _hf_loss_fn(model, device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if spec.family == "padless" and spec.cuda_graphs and device.type == "cuda":
            run = _padless_graph_fn(model, device, spec.checkpointing, batches, ss.max_len, params)
            row["static_shape"] = str(run.static_shape)
        elif spec.family == "padless":
            run = _padless_loss_fn(model, device, spec.checkpointing)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
        row["trainable_params"] = sum(p.numel() for p in params)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak below includes the weights, not the init
        profiled = spec.family == "padless" and any(fnmatch(spec.name, p) for p in cfg.profile.split(",") if p)
        prof_dir = Path(cfg.out) / f"profile-{spec.name}" if profiled else None
        gc_stats: list[float] = []
        # padless's trainer freezes the objects alive at its loop's start (train.host_gc); its rows do the same.
        frozen = _frozen_gc() if spec.family == "padless" else contextlib.nullcontext()
        with frozen:
            losses, times, norms, retries = _timed_loop(
                model, run, batches, steps, device, params, opt, prof_dir, gc_stats
            )
        row.update(_summarise(spec, steps, batches, losses, times, norms, mcfg, cfg, device))
        row["alloc_retries"] = retries
        row["gc_s"] = gc_stats
        row["notes"] = notes
    except torch.OutOfMemoryError as error:  # keep the table: record it and go on (the caller frees memory)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        row["status"] = f"OOM (peak {peak:.1f} GiB): {str(error).splitlines()[0][:100]}"
        row["peak_gib"] = peak
    return row


def _summarise(spec, steps, batches, losses, times, norms, mcfg, cfg, device) -> dict[str, Any]:
    timed = slice(spec.warmup, spec.warmup + spec.steps)
    t = sum(times[timed])
    real = sum(s.num_tokens for s in steps[timed])
    trainable = sum(s.num_trainable for s in steps[timed])
    processed = sum(getattr(b, "padded_tokens", getattr(b, "num_tokens", 0)) for mbs in batches[timed] for b in mbs)
    per_token, per_sq = flops_per_token(mcfg)
    flops = sum(per_token * s.num_tokens + per_sq * s.sum_sq_len for s in steps[timed])
    peak = cfg.peak_tflops * 1e12
    return {
        "tokens_per_s": real / t,
        "trainable_tokens_per_s": trainable / t,
        "mfu": flops / t / peak if device.type == "cuda" else None,
        "step_s_median": statistics.median(times[timed]),
        "first_step_s": times[0],
        "warmup_s": sum(times[: spec.warmup]),
        "timed_s": t,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses,
        "grad_norms": norms,
        "step_times": times,
        "tokens_per_step": [s.num_tokens for s in steps],
        "examples_per_step": [len(s.examples) for s in steps],
        "micro_batches_per_step": statistics.mean(len(mbs) for mbs in batches),
        "pad_fraction": 1.0 - real / processed if processed else 0.0,
        "flops_per_token": per_token,
    }
