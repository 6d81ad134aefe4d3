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
        self.numel = sum(p.numel() for p in self.params)
        self._snapshot: Optional[Tensor] = None
        self._dev_grad: Optional[Tensor] = None
        self._copies: dict[str, Tensor] = {}
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def _views(self, flat: Tensor) -> list[Tensor]:
        return list(torch.split(flat, [p.numel() for p in self.params]))

    def start_step(self, dev_grad: Tensor) -> None:
        """Begin an optimizer step: `.grad` must be empty; `dev_grad` is the flat dev gradient."""
        if dev_grad.numel() != self.numel:
            raise ValueError(f"dev gradient has {dev_grad.numel()} entries, the encoder {self.numel}")
        self._dev_grad = dev_grad.float()
        if self._snapshot is None or self._snapshot.device != dev_grad.device:
            self._snapshot = torch.zeros(self.numel, device=dev_grad.device)
        else:
            self._snapshot.zero_()
        self._sums.clear()
        self._counts.clear()

    def record(self, name: str) -> None:
        """Call right after objective `name`'s backward."""
        if self._dev_grad is None:
            raise RuntimeError("record() before start_step()")
        snapshots = self._views(self._snapshot)
        dev = self._views(self._dev_grad)
        dot = torch.zeros((), device=self._snapshot.device)
        sq_norm = torch.zeros((), device=self._snapshot.device)
        for param, snap, dev_part in zip(self.params, snapshots, dev):
            if param.grad is None:
                continue
            grad = param.grad.reshape(-1)
            torch.sub(grad, snap, out=snap)
            dot += torch.dot(snap, dev_part)
            sq_norm += torch.dot(snap, snap)
        if self.keep_copies:
            self._copies[name] = self._snapshot.clone()
        for param, snap in zip(self.params, snapshots):
            if param.grad is not None:
                snap.copy_(param.grad.reshape(-1))
        if self.keep_copies:
            return
        self._accumulate(name, dot, sq_norm)

    def end_micro_batch(self) -> None:
        """Cosines from stored per-objective copies (the paper's memory layout, kept for the ablation)."""
        for name, grad in self._copies.items():
            self._accumulate(name, torch.dot(grad, self._dev_grad), torch.dot(grad, grad))
        self._copies.clear()

    def _accumulate(self, name: str, dot: Tensor, sq_norm: Tensor) -> None:
        dev_norm = self._dev_grad.norm()
        cos = dot / (sq_norm.sqrt() * dev_norm).clamp_min(self.eps)
        self._sums[name] = self._sums.get(name, 0.0) + cos
        self._counts[name] = self._counts.get(name, 0) + 1

    def finish_step(self) -> dict[str, Tensor]:
        """Mean cosine per objective over the step's micro-batches."""
        cosines = {name: total / self._counts[name] for name, total in self._sums.items()}
        self._dev_grad = None
        return cosines
