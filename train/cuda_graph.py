"""A micro-batch's whole forward + backward as one CUDA graph: the host launches one graph, not ~10^4 kernels.

Why: an 8B LoRA step runs about 10,000 kernels (36 layers x (forward, recompute, backward) x ~90 ops). Each costs
the host 5-40 us of Python, autograd and launch work, so a 1K-token micro-batch, whose GPU work is ~0.1 s, took
0.39 s on an H200, bound by the host. Capturing the forward and backward once and replaying the graph makes the
step cost what the GPU needs.

How: every micro-batch is padded on the host to one :class:`train.static_batch.StaticShape` (filler examples that
change no loss or gradient) and copied into static device buffers; the first call warms up (Triton compiles,
cuBLAS picks its kernels, gradients get allocated), then captures ``(loss_sum * scale).backward()``; every call
replays it. Gradients accumulate in place into the parameters' existing ``.grad`` tensors, so several replays make
a gradient-accumulation step exactly as eager backwards do; the caller must therefore zero gradients in place
(``optimizer.zero_grad(set_to_none=False)``), never drop them. The optimizer step, clipping and logging stay eager
(a handful of fused launches).

Requirements (checked where they can be): one process (DDP/FSDP hooks are not captured), CUDA, no host syncs in the
loss path (padless's patched path has none), no RNG in the step (LoRA dropout 0: checkpointing and the tiled MLP are
told not to save RNG state; the tiled MLP's per-tile backward is captured with the rest), checkpointing ``off`` or
``on`` (``offload`` allocates pinned host memory, which a capture cannot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .batch import MicroBatch
from .memory_breakdown import ForwardMemory
from .static_batch import StaticShape, pad_micro_batch

__all__ = ["GraphCaptureError", "GraphedMicroStep"]

LossFn = Callable[[MicroBatch], tuple[torch.Tensor, torch.Tensor]]


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (the message says why; eager mode still works)."""


class GraphedMicroStep:
    """``step(batch, scale)`` = ``loss_sum, _ = loss_fn(batch); (loss_sum * scale).backward()``, as a CUDA graph.

    ``loss_fn`` maps a device :class:`MicroBatch` to (loss_sum, n_counted) (``train.packed_forward.packed_loss``);
    ``params`` are the trainable parameters whose ``.grad`` the backward accumulates into; ``shape`` must hold every
    micro-batch the run will see. The returned loss tensor is static: it is overwritten by the next call, so
    consume it (``total += loss``) before calling again.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[torch.Tensor],
        shape: StaticShape,
        device: torch.device,
        *,
        warmup: int = 2,
        forward_memory: ForwardMemory | None = None,
    ) -> None:
        if torch.device(device).type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need a CUDA device; got {device}. Use --cuda-graphs off on CPU.")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.shape = shape
        self.device = torch.device(device)
        self.warmup = warmup
        # measures the warm-up forwards (the replays cannot be read apart)
        self.forward_memory = forward_memory or ForwardMemory(self.device, enabled=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._loss: torch.Tensor | None = None
        self._scale = torch.zeros((), dtype=torch.float32, device=self.device)
        self._host: MicroBatch | None = None  # keeps the last pinned source alive until its copy has run
        n, s = shape.tokens, shape.examples
        self._batch = MicroBatch(
            input_ids=torch.zeros(n, dtype=torch.int64, device=self.device),
            position_ids=torch.zeros(n, dtype=torch.int64, device=self.device),
            labels=torch.zeros(n, dtype=torch.int64, device=self.device),
            cu_seqlens=torch.zeros(s + 1, dtype=torch.int32, device=self.device),
            max_seqlen=shape.max_seqlen,
            num_tokens=n,
            num_trainable=0,  # a placeholder: the loaded batches' counts differ
            mean_seqlen=shape.mean_seqlen,  # fixed at capture: the tiling is part of the graph
            # The lm_head's rows, fixed at capture too: the shape's max_trainable, else every token.
            counted_bound=shape.tokens if shape.max_trainable is None else shape.max_trainable,
        )

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _load(self, batch: MicroBatch, scale: float) -> None:
        padded = pad_micro_batch(batch, self.shape)
        if self.device.type == "cuda" and not padded.input_ids.is_pinned():
            padded = padded.pin_memory()
        for name in ("input_ids", "position_ids", "labels", "cu_seqlens"):
            getattr(self._batch, name).copy_(getattr(padded, name), non_blocking=True)
        self._scale.fill_(scale)
        self._host = padded

    def _forward_backward(self, measure: bool = False) -> torch.Tensor:
        with self.forward_memory.forward(measure):
            loss_sum, _ = self.loss_fn(self._batch)
        (loss_sum * self._scale).backward()
        return loss_sum.detach()

    def _capture(self) -> None:
        stash = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph's docs ask
            for i in range(self.warmup):  # the first also makes what persists (RoPE cache, cuBLAS workspace)
                self._forward_backward(measure=i > 0)
        torch.cuda.current_stream(self.device).wait_stream(side)
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise GraphCaptureError(
                f"{len(missing)} trainable parameters got no gradient in the warm-up backward; a graph cannot "
                "allocate them later. Freeze them, or use --cuda-graphs off."
            )
        pointers = [p.grad.data_ptr() for p in self.params]
        graph = torch.cuda.CUDAGraph()
        try:
            try:
                with torch.cuda.graph(graph):
                    loss = self._forward_backward()
            except RuntimeError as error:
                raise GraphCaptureError(
                    f"capturing the micro-batch as a CUDA graph failed ({str(error).splitlines()[0][:200]}); "
                    "something in the loss path syncs with the host or is not capturable, or an autograd graph of an "
                    "earlier eager step is still referenced (a kept loss tensor). Use --cuda-graphs off."
                ) from error
            moved = sum(p.grad.data_ptr() != ptr for p, ptr in zip(self.params, pointers))
            if moved:
                raise GraphCaptureError(
                    f"{moved} gradients were re-allocated during capture instead of accumulated in place (something "
                    "holds a reference to .grad); the graph would not accumulate. Use --cuda-graphs off."
                )
        finally:
            # The warm-up's gradients are not this step's: put back what was there before (also on failure, so
            # that an eager retry starts from the right gradients).
            for p, old in zip(self.params, stash):
                if p.grad is None:
                    continue
                if old is None:
                    p.grad.zero_()
                else:
                    p.grad.copy_(old)
        self.graph, self._loss = graph, loss

    def __call__(self, batch: MicroBatch, scale: float) -> torch.Tensor:
        """Pad and load ``batch`` (host tensors), run forward + backward (capturing on the first call); return the
        micro-batch's loss sum (a static 0-dim tensor, valid until the next call)."""
        self._load(batch, scale)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self._loss
