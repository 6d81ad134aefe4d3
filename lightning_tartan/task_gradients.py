"""Per-objective gradient cosines read off `.grad`, in memory that does not grow with the number of objectives.

Objectives are backpropagated one after another into the same `.grad`. The gradient of objective t is the
change of `.grad` across its backward, so one snapshot buffer suffices: after each backward, turn the
snapshot into that difference in place, take its dot products with the dev gradient, then copy `.grad`
back into the snapshot. Under DDP each backward all-reduces, so the differences are global gradients and
every rank computes the same cosines.
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
        self._snapshot: list[Tensor] = []
        self._dev_grad: list[Tensor] = []
        self._dev_norm: Optional[Tensor] = None
        self._copies: dict[str, list[Tensor]] = {}
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def start_step(self) -> None:
        """Begin an optimizer step; `.grad` must be empty."""
        if not self._snapshot or self._snapshot[0].device != self.params[0].device:
            self._snapshot = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        else:
            for snap in self._snapshot:
                snap.zero_()
        self._sums.clear()
        self._counts.clear()

    def set_dev_gradient(self, dev_grad: Sequence[Tensor]) -> None:
        """The dev gradient the next objectives are compared with, one tensor per parameter (it may change
        between the micro-batches of a step: the paper draws a fresh dev sample for each)."""
        if len(dev_grad) != len(self.params):
            raise ValueError(f"dev gradient has {len(dev_grad)} tensors for {len(self.params)} parameters")
        self._dev_grad = list(dev_grad)
        self._dev_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dev_grad]))

    def record(self, name: str) -> None:
        """Call right after objective `name`'s backward."""
        if self._dev_norm is None:
            raise RuntimeError("record() before set_dev_gradient()")
        dot = torch.zeros((), device=self._dev_norm.device)
        sq_norm = torch.zeros((), device=self._dev_norm.device)
        for param, snap, dev in zip(self.params, self._snapshot, self._dev_grad):
            if param.grad is None:
                continue
            torch.sub(param.grad, snap, out=snap)
            dot += torch.vdot(snap.reshape(-1), dev.reshape(-1))
            sq_norm += torch.vdot(snap.reshape(-1), snap.reshape(-1))
        if self.keep_copies:
            self._copies[name] = [snap.clone() for snap in self._snapshot]
        for param, snap in zip(self.params, self._snapshot):
            if param.grad is not None:
                snap.copy_(param.grad)
        if not self.keep_copies:
            self._accumulate(name, dot, sq_norm)

    def end_micro_batch(self) -> None:
        """Cosines from stored per-objective copies (the paper's memory layout, kept for the ablation)."""
        for name, grad in self._copies.items():
            dot = sum(torch.vdot(g.reshape(-1), d.reshape(-1)) for g, d in zip(grad, self._dev_grad))
            sq_norm = sum(torch.vdot(g.reshape(-1), g.reshape(-1)) for g in grad)
            self._accumulate(name, dot, sq_norm)
        self._copies.clear()

    def _accumulate(self, name: str, dot: Tensor, sq_norm: Tensor) -> None:
        cos = dot / (sq_norm.sqrt() * self._dev_norm).clamp_min(self.eps)
        self._sums[name] = self._sums.get(name, 0.0) + cos
        self._counts[name] = self._counts.get(name, 0) + 1

    def finish_step(self) -> dict[str, Tensor]:
        """Mean cosine per objective over the step's micro-batches."""
        cosines = {name: total / self._counts[name] for name, total in self._sums.items()}
        self._dev_grad, self._dev_norm = [], None
        return cosines
