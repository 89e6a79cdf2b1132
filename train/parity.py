"""``train parity``: on YOUR shards and model, does packed training equal running every example alone?

Takes the first few packs of a shard set and the model, and computes the summed token loss and the gradient of
every parameter twice: (1) packed, through padless's varlen path (one stream, ``cu_seqlens``, patched kernels);
(2) one by one, through the UNPATCHED Hugging Face model on each example alone with position_ids from 0 and the
usual shifted cross-entropy. Packing is correct when the two agree to the dtype's precision; any leak across
example boundaries (attention, positions, a loss shift) shows up as a difference far above it.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batch import IGNORE_INDEX, concat_packs
from .config import TrainError

__all__ = ["ParityReport", "parity"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ParityReport:
    """Packed-vs-one-by-one differences (relative errors are ‖a − b‖ / ‖b‖)."""

    packs: int
    examples: int
    tokens: int
    trainable_tokens: int
    dtype: str
    loss_packed: float
    loss_one_by_one: float
    loss_rel_err: float
    grad_rel_err: float
    grad_max_abs_diff: float
    worst_param: str
    worst_param_rel_err: float
    tolerance: float
    per_pack: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.loss_rel_err <= self.tolerance and self.grad_rel_err <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def render(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings] + [
            f"parity on {self.packs} packs ({self.examples} examples, {self.tokens} tokens, "
            f"{self.trainable_tokens} trained), {self.dtype}",
            f"{'pack':>6} {'packed loss':>14} {'one-by-one':>14} {'rel err':>10}",
        ]
        for row in self.per_pack:
            lines.append(f"{row['pack']:>6} {row['packed']:>14.6f} {row['one_by_one']:>14.6f} {row['rel_err']:>10.2e}")
        lines += [
            f"loss (sum over tokens): packed {self.loss_packed:.6f}, one by one {self.loss_one_by_one:.6f}, "
            f"rel err {self.loss_rel_err:.2e}",
            f"gradients: rel err {self.grad_rel_err:.2e}, max |diff| {self.grad_max_abs_diff:.2e}, worst "
            f"{self.worst_param} ({self.worst_param_rel_err:.2e})",
            ("PASS" if self.passed else "FAIL")
            + f": packed {'==' if self.passed else '!='} one-by-one within {self.tolerance:.0e} "
            f"(loss {self.loss_rel_err:.1e}, grad {self.grad_rel_err:.1e})",
        ]
        return "\n".join(lines)


def _one_by_one_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ token losses of one example through the stock HF forward (positions 0..L-1, no mask, shifted CE)."""
    logits = model(input_ids=input_ids[None], use_cache=False).logits[0].float()
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def parity(
    shards_path: str,
    *,
    model: str | None = None,
    packs: int = 4,
    family: str = "llama",
    dtype: str = "fp32",
    device: str | None = None,
    tolerance: float | None = None,
    force: bool = False,
) -> ParityReport:
    """Compare packed and one-by-one loss and gradients on the first ``packs`` packs of ``shards_path``.

    The shards' tokenizer must be the model's (``force``: report a mismatch as a warning instead); token ids past
    the model's embedding are refused either way.
    """
    from padless.shards.reader import open_shards

    from .model_patch import get_patch, patch_model
    from .modeling import load_model
    from .packed_forward import packed_loss
    from .prepare import check_model_source, check_positions, check_tokenizer, parse_device, tiny_model_vocab

    if packs < 1:
        raise TrainError(f"--packs must be >= 1, got {packs}")
    ss = open_shards(shards_path)
    chosen = [ss[i] for i in range(min(packs, len(ss)))]
    dev = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_model_source(model)
    vocab = tiny_model_vocab(ss.manifest) if model is None else None
    net = load_model(model, vocab_size=vocab, family=family, dtype=_DTYPES[dtype],
                     device=str(dev), seed=0)  # fmt: skip
    net.eval()  # no dropout: both paths must see the same function
    max_token_id = max((int(p.input_ids.max()) for p in chosen if p.num_tokens), default=-1)
    warnings = check_tokenizer(ss.manifest, model, net, force=force, max_token_id=max_token_id)
    warnings += check_positions(
        max((int(p.max_seqlen) for p in chosen), default=0), net, f"the shard set {str(shards_path)!r}"
    )
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    weights = [p for _, p in params]

    # Packed: all chosen packs as one varlen stream through the patched path.
    patch_model(net)
    batch = concat_packs(chosen).to(dev)
    loss_packed, _ = packed_loss(net, batch)
    grads_packed = torch.autograd.grad(loss_packed, weights, allow_unused=True)
    with torch.no_grad():
        per_pack_packed = [float(packed_loss(net, concat_packs([p]).to(dev))[0]) for p in chosen]
    handle = get_patch(net)
    if handle is not None:
        handle.unpatch()  # the reference is stock transformers

    # One by one: every example alone through the unpatched model.
    per_pack_single, total = [], None
    for pack in chosen:
        ids = torch.as_tensor(pack.input_ids.astype("int64"), device=dev)
        labels = torch.as_tensor(pack.labels, device=dev)
        cu = pack.cu_seqlens.tolist()
        pack_loss = sum(_one_by_one_loss(net, ids[a:b], labels[a:b]) for a, b in itertools.pairwise(cu))
        per_pack_single.append(float(pack_loss.detach()))
        total = pack_loss if total is None else total + pack_loss
    grads_single = torch.autograd.grad(total, weights, allow_unused=True)

    diff_sq = ref_sq = 0.0
    worst, worst_err, max_abs = "", 0.0, 0.0
    for (name, p), gp, gs in zip(params, grads_packed, grads_single):
        gp = torch.zeros_like(p) if gp is None else gp
        gs = torch.zeros_like(p) if gs is None else gs
        d = (gp.double() - gs.double()).norm().item() ** 2
        r = gs.double().norm().item() ** 2
        diff_sq, ref_sq = diff_sq + d, ref_sq + r
        max_abs = max(max_abs, (gp.double() - gs.double()).abs().max().item())
        err = (d**0.5) / (r**0.5) if r > 0 else d**0.5
        if err > worst_err:
            worst, worst_err = name, err
    lp, ls = float(loss_packed.detach()), float(total.detach())
    tol = tolerance if tolerance is not None else (1e-4 if dtype == "fp32" else 2e-2)
    return ParityReport(
        packs=len(chosen),
        examples=sum(p.num_examples for p in chosen),
        tokens=sum(p.num_tokens for p in chosen),
        trainable_tokens=sum(p.num_trainable for p in chosen),
        dtype=dtype,
        loss_packed=lp,
        loss_one_by_one=ls,
        loss_rel_err=abs(lp - ls) / abs(ls) if ls else abs(lp - ls),
        grad_rel_err=(diff_sq**0.5) / (ref_sq**0.5) if ref_sq > 0 else diff_sq**0.5,
        grad_max_abs_diff=max_abs,
        worst_param=worst,
        worst_param_rel_err=worst_err,
        tolerance=tol,
        per_pack=[
            {"pack": i, "packed": a, "one_by_one": b, "rel_err": abs(a - b) / abs(b) if b else abs(a - b)}
            for i, (a, b) in enumerate(zip(per_pack_packed, per_pack_single))
        ],
        warnings=warnings,
    )
