"""Fused linear cross-entropy rows of tools/bench_kernels.py: lm_head + next-token CE, frozen and trainable weight.

Two weight modes, reported separately: ``frozen`` (``weight.requires_grad`` False: LoRA, the trainer's case;
only grad_hidden is computed) and ``trainable`` (full fine-tuning: grad_hidden and grad_weight).

Timing: forward+backward as one unit (``torch.autograd.grad`` of the loss sum), event-timed, median of 3 after a
warm-up (each call is 5-150 ms, so launch overhead is noise and CUDA graphs are not needed; Liger's loss also
syncs with the host, which a graph capture would refuse). Ours and Liger's compute the gradients inside the
forward, so a "backward" alone is a near-free scaling and a forward-only time under grad mode is really
forward+backward: run 1's Liger "fwd 54 ms, bwd 1.2 ms" and negative bwd came from that. The table therefore
gives fwd+bwd, plus ``loss only`` (no_grad: just the loss) for ours and eager; Liger computes gradients even
under no_grad, so its loss-only time is not reported.

Breakdown (GPU only, in the ``note`` of the frozen padless row, so the table keeps its columns): one chunk's
three steps timed alone (event-timed median of 10 after a warm-up): the logits GEMM (TFLOP/s), the Triton row
kernel with the gradient (TB/s of its 3 x C x V x 2 bytes: two reads, one write) and without (loss only, one
read), the grad_hidden GEMM; times the chunk count. It says how much of fwd+bwd is GEMM and how much row kernel.

Memory: ``peak - inputs`` = peak allocated during one fwd+bwd minus what was allocated before it (hidden,
weight, labels), so it includes the returned grad_hidden (T x E) and, when trainable, grad_weight (V x E,
1.16 GiB at Qwen3-8B); ``minus wgrad`` subtracts the weight gradient, which any method must hold.
"""

from __future__ import annotations

from collections.abc import Callable

from bench_kernels_timing import GiB, Timer, peak_minus_inputs_gib, try_import

__all__ = ["ce_markdown", "cross_entropy_rows"]

_LIGER_NO_LOSS_ONLY = "Liger computes gradients in its forward (even under no_grad): only fwd+bwd is meaningful"


def _chunk_breakdown(ce, h, w, labels, timer: Timer) -> str:
    """One chunk's logits GEMM, row kernel (with / without the gradient) and grad_hidden GEMM, timed alone."""
    import torch

    t, e = h.shape
    v = w.shape[0]
    rows = ce._chunk_rows(t, v, h.element_size(), ce.auto_chunk_bytes(w, False))
    n_chunks = -(-t // rows)
    hc = h.detach()[:rows]
    logits = torch.empty(rows, v, dtype=h.dtype, device=h.device)
    grad_h = torch.empty(rows, e, dtype=h.dtype, device=h.device)
    targets = labels[1 : rows + 1].clone() if rows < t else torch.cat([labels[1:], labels.new_full((1,), -100)])
    row_loss = torch.empty(rows, dtype=torch.float32, device=h.device)

    def timed(fn) -> float:
        return timer.slow(fn, reps=10)

    mm_ms = timed(lambda: torch.mm(hc, w.T, out=logits))
    # The row kernel overwrites the logits with dlogits; refill before each gradient call (refill timed apart).
    fill_ms = timed(lambda: torch.mm(hc, w.T, out=logits))
    rows_ms = timed(lambda: (torch.mm(hc, w.T, out=logits), ce._launch_ce_rows(logits, targets, row_loss, -100,
                                                                               None, True))) - fill_ms  # fmt: skip
    torch.mm(hc, w.T, out=logits)
    loss_ms = timed(lambda: ce._launch_ce_rows(logits, targets, row_loss, -100, None, False))
    gh_ms = timed(lambda: torch.mm(logits, w, out=grad_h))
    flop = 2 * rows * e * v
    nbytes = rows * v * h.element_size()
    total = n_chunks * (mm_ms + rows_ms + gh_ms)
    return (
        f"x{n_chunks} chunks = {total:.2f} ms; per {rows}-row chunk: "
        f"logits GEMM {mm_ms:.3f} ms ({flop / mm_ms / 1e9:.0f} TFLOP/s), "
        f"rows+grad {rows_ms:.3f} ms ({3 * nbytes / rows_ms / 1e9:.2f} TB/s), rows loss-only {loss_ms:.3f} ms "
        f"({nbytes / loss_ms / 1e9:.2f} TB/s), grad_hidden GEMM {gh_ms:.3f} ms ({flop / gh_ms / 1e9:.0f} TFLOP/s)"
    )


def cross_entropy_rows(t: int, shape: dict, timer: Timer, device) -> list[dict]:
    import torch
    import torch.nn.functional as F

    e, v = shape["E"], shape["V"]
    dt = torch.bfloat16
    h = (torch.randn(t, e, device=device, dtype=dt) * 0.5).requires_grad_(True)
    w_train = (torch.randn(v, e, device=device, dtype=dt) * 0.02).requires_grad_(True)
    w_frozen = w_train.detach()  # same storage, requires_grad False
    labels = torch.randint(0, v, (t,), device=device)
    labels[:: max(1, t // 64)] = -100  # a few masked tokens (example starts)
    wgrad_gib = w_train.numel() * w_train.element_size() / GiB

    ce, ce_why = try_import("kernels.cross_entropy")
    liger, liger_why = try_import("liger_kernel.transformers")
    liger_loss = None
    if liger is not None and hasattr(liger, "LigerFusedLinearCrossEntropyLoss"):
        liger_loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")
    elif liger is not None:
        liger_why = "liger_kernel.transformers has no LigerFusedLinearCrossEntropyLoss"

    rows = []
    for mode, w in (("frozen", w_frozen), ("trainable", w_train)):
        wrt = (h, w) if w.requires_grad else (h,)

        def eager(w=w):
            logits = (h @ w.T)[:-1].float()
            return F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")

        def liger_ce(w=w):
            out = liger_loss(w, h[:-1], labels[1:])
            return out[0] if isinstance(out, tuple) else out  # some Liger versions also return extras

        impls: dict[str, tuple[Callable | None, str]] = {
            "padless": (
                (lambda w=w: ce.fused_linear_cross_entropy(h, w, labels)[0]) if ce is not None else None,
                "" if ce is not None else "n/a: " + ce_why,
            ),
            "eager": (eager, ""),
            "liger": (liger_ce if liger_loss is not None else None, "" if liger_loss else "n/a: " + liger_why),
        }
        for impl, (fn, note) in impls.items():
            row = {"kernel": "linear_ce", "T": t, "weight": mode, "impl": impl, "note": note}
            row |= dict.fromkeys(("fwdbwd_ms", "loss_only_ms", "peak_minus_inputs_gib", "minus_wgrad_gib"))
            if fn is None:
                rows.append(row)
                continue
            step = "fwd+bwd"
            try:

                def full(fn=fn, wrt=wrt):
                    return torch.autograd.grad(fn(), wrt)

                row["fwdbwd_ms"] = timer.slow(full)
                if impl == "liger":
                    row["note"] = _LIGER_NO_LOSS_ONLY
                else:
                    step = "loss only"
                    with torch.no_grad():
                        row["loss_only_ms"] = timer.slow(fn)
                step = "memory"
                peak = peak_minus_inputs_gib(full, timer.cuda)
                row["peak_minus_inputs_gib"] = peak
                if peak is not None and mode == "trainable":
                    row["minus_wgrad_gib"] = peak - wgrad_gib
                if timer.cuda and impl == "padless" and mode == "frozen":
                    step = "breakdown"
                    row["note"] = _chunk_breakdown(ce, h, w, labels, timer)
            except Exception as error:  # one failing implementation must not stop the table
                row["note"] = f"{step}: {type(error).__name__}: {error}"[:200]
            rows.append(row)
            if timer.cuda:
                torch.cuda.empty_cache()
    return rows


def ce_markdown(rows: list[dict]) -> list[str]:
    def f(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "## Fused linear cross-entropy (lm_head + CE, sum over counted tokens)",
        "",
        "fwd+bwd = one `torch.autograd.grad` of the loss (ours and Liger compute gradients inside the forward, so",
        "only fwd+bwd compares like with like). frozen = `weight.requires_grad` False (LoRA, the trainer's case).",
        "peak - inputs includes the returned grad_hidden (and grad_weight when trainable); minus wgrad removes",
        "grad_weight (V x E), which every method must hold.",
        "",
        "| T | weight | impl | fwd+bwd ms | loss only ms (no_grad) | peak - inputs GiB | minus wgrad GiB | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['weight']} | {r['impl']} | {f(r['fwdbwd_ms'], 2)} | {f(r['loss_only_ms'], 2)} | "
            f"{f(r['peak_minus_inputs_gib'], 2)} | {f(r['minus_wgrad_gib'], 2)} | {r['note']} |"
        )
    return lines
