"""Per-objective gradient cosines read off `.grad`, in memory that does not grow with the number of objectives.

Objectives are backpropagated one after another into the same `.grad`. The gradient of objective t is the
change of `.grad` across its backward, so one snapshot buffer suffices: after each backward, turn the
snapshot into that difference in place, take its dot products with the dev gradient, then copy `.grad`
back into the snapshot. Under DDP each backward all-reduces, so the differences are global gradients and
every rank computes the same cosines.

For the parameters' gradients to be read with a few whole-buffer operations rather than several per parameter
(hundreds of small kernels per backward on a GPU), the step's first backward leaves autograd's own gradient tensors,
which one `cat` gathers into a flat buffer; from then on the trained parameters' `.grad` are views into that buffer,
and autograd and DDP accumulate into them in place. (Views set before the first backward would cost one addition
per parameter: autograd adds into a `.grad` that exists, and takes its result as `.grad` when there is none.) The
flat buffer lives from the first backward to the optimizer step, where any training keeps its gradients. The
snapshot and the dev gradient are flat buffers of the same size: the two encoder-sized buffers META-TARTAN costs.
The dev gradient's is kept between steps. The snapshot is made after the `cat`, once autograd's own gradients are
gone, and dropped when the step ends: kept, it would be a third buffer beside the two copies of the gradient the
`cat` briefly holds.

The dot products run in fp32 with autocast off, whatever the step's precision. Under the step's autocast `@` would
cast both fp32 buffers to bf16 or fp16 (two half-size copies, and four cast kernels, per objective), and an fp16
run's gradients carry the loss scale (2^16 at first), so their squared norm overflows fp16: every cosine came out
NaN and every META-TARTAN update was skipped as an overflow.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class TaskGradientCosines:
    """Accumulates cos(g_dev, g_t) per objective over the micro-batches of one optimizer step."""

    def __init__(self, params: Sequence[nn.Parameter], keep_copies: bool = False, eps: float = 1e-12) -> None:
        self.params = list(params)
        self.keep_copies = keep_copies
        self.eps = eps
        self._trained: list[nn.Parameter] = []
        self._grads: Optional[Tensor] = None  # this step's `.grad` of the trained parameters, as one flat buffer
        self._snapshot: Optional[Tensor] = None
        self._dev_grad: Optional[Tensor] = None
        self._dev_norm: Optional[Tensor] = None
        self._copies: dict[str, Tensor] = {}
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def start_step(self) -> None:
        """Begin an optimizer step: the trained parameters' `.grad` are cleared, for the first backward to fill."""
        self._trained = [param for param in self.params if param.requires_grad]
        size = sum(param.numel() for param in self._trained)
        first = self._trained[0]
        if self._dev_grad is None or self._dev_grad.numel() != size or self._dev_grad.device != first.device:
            self._dev_grad = torch.zeros(size, device=first.device, dtype=torch.float32)
        for param in self._trained:
            param.grad = None
        self._grads = None
        self._sums.clear()
        self._counts.clear()

    def set_dev_gradient(self, dev_grad: Sequence[Tensor]) -> None:
        """The dev gradient the next objectives are compared with, one tensor per parameter (it may change
        between the micro-batches of a step: the paper draws a fresh dev sample for each)."""
        if len(dev_grad) != len(self.params):
            raise ValueError(f"dev gradient has {len(dev_grad)} tensors for {len(self.params)} parameters")
        trained = [grad.reshape(-1) for grad, param in zip(dev_grad, self.params) if param.requires_grad]
        torch.cat(trained, out=self._dev_grad)
        with self._in_fp32():
            self._dev_norm = torch.linalg.vector_norm(self._dev_grad)

    def record(self, name: str) -> None:
        """Call right after objective `name`'s backward."""
        if self._dev_norm is None:
            raise RuntimeError("record() before set_dev_gradient()")
        first = self._grads is None
        if first:  # the step's first backward: its gradient is all there is
            self._gather()
            self._snapshot = gradient = self._grads.to(torch.float32, copy=True)
        else:
            gradient = torch.sub(self._grads, self._snapshot, out=self._snapshot)  # this objective's
        if self.keep_copies:
            self._copies[name] = gradient.clone()
        else:
            self._accumulate(name, gradient)
        if not first:
            self._snapshot.copy_(self._grads)

    def _gather(self) -> None:
        """The first backward's gradients into one flat buffer, and `.grad` its views from now on (a parameter this
        backward did not reach has a zero gradient, as it would have accumulating into a zeroed buffer)."""
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self._trained]
        self._grads = torch.cat([grad.reshape(-1) for grad in grads])
        for param, piece in zip(self._trained, self._grads.split([param.numel() for param in self._trained])):
            param.grad = piece.view_as(param)

    def end_micro_batch(self) -> None:
        """Cosines from stored per-objective copies (the paper's memory layout, kept for the ablation)."""
        for name, grad in self._copies.items():
            self._accumulate(name, grad)
        self._copies.clear()

    def _accumulate(self, name: str, gradient: Tensor) -> None:
        with self._in_fp32():
            dot, sq_norm = torch.dot(gradient, self._dev_grad), torch.dot(gradient, gradient)
            cos = dot / (sq_norm.sqrt() * self._dev_norm).clamp_min(self.eps)
        self._sums[name] = self._sums.get(name, 0.0) + cos
        self._counts[name] = self._counts.get(name, 0) + 1

    def _in_fp32(self) -> torch.autocast:
        return torch.autocast(self._dev_grad.device.type, enabled=False)

    def finish_step(self) -> dict[str, Tensor]:
        """Mean cosine per objective over the step's micro-batches."""
        cosines = {name: total / self._counts[name] for name, total in self._sums.items()}
        self._dev_norm = None
        self._grads = None  # the optimizer has stepped: the next step's first backward brings its own gradients
        self._snapshot = None
        return cosines
