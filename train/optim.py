"""Optimizer and learning-rate schedule: AdamW (torch fused on CUDA, or bitsandbytes 8-bit), warm-up + cosine.

Weight decay applies to matrices only: norms, biases and other 1-D parameters never decay (the usual AdamW
practice; decaying a norm's gain pulls it to zero).
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig, TrainError

__all__ = ["build_optimizer", "build_scheduler", "check_optimizer", "lr_factor", "reapply_hyperparameters"]


def check_optimizer(cfg: TrainConfig, device: torch.device) -> None:
    """``--optimizer`` can run on ``device`` (called before a run writes anything)."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise TrainError(f"--optimizer adamw8bit needs bitsandbytes ({error}); pip install bitsandbytes") from error
        if device.type != "cuda":
            raise TrainError("--optimizer adamw8bit needs a CUDA device; use --optimizer adamw on CPU")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in two groups (decay for >= 2-D, none for the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters; check --target-modules (it matched no module)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    check_optimizer(cfg, device)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    # Fused AdamW: one kernel for all parameters on CUDA. On CPU the default (foreach) path is used, except for fp16
    # parameters (--full --dtype fp16): it computes in fp16, where eps=1e-8 rounds to 0 and an element whose
    # gradient is 0 (an unused embedding row) becomes 0/0 = NaN; the fused kernel computes in fp32.
    fused = device.type == "cuda" or any(p.dtype == torch.float16 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warm-up, then a cosine that reaches
    ``min_ratio`` at ``total_steps``, one step past the last, as transformers' ``get_cosine_schedule_with_warmup``
    decays (with the default floor 0, a last step at the floor would train at lr 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over ``total_steps`` optimizer steps (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_ratio=cfg.min_lr_ratio
        ),
    )


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                            cfg: TrainConfig) -> None:  # fmt: skip
    """After loading a checkpoint: use ``cfg``'s peak lr and weight decay, and its schedule at the loaded step.

    Loading restores the saved optimizer's lr and weight decay and the scheduler's base lrs; a resume that changes
    them (``--resume-changed``) puts the new values back. The schedule's shape (warm-up, total steps, floor) comes
    from ``cfg`` already: the scheduler's lambda is this run's.
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * fn(step)
        if any(p.ndim >= 2 for p in group["params"]):  # the decay group (see build_optimizer)
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
