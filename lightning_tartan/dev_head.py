"""The dev head of META-TARTAN: a fresh end-task head fitted on a dev sample, whose loss gives the dev gradient.

The encoder is frozen (eval mode) while the head is fitted, so its features are fixed and one forward serves
every fitting step (the paper's code re-ran the encoder at each one; the module's
`dev_head_on_cached_features=False` restores that for comparison). The gradient of the fitted head's loss with
respect to the encoder's parameters is taken with `torch.autograd.grad`, so `.grad` and DDP's reducer are left
untouched, and it stays one tensor per parameter: no flat copy.
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tartan.heads import ClassificationHead

#: devices with torch's fused AdamW kernel
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")


class DevHead:
    """Fits a dev head (`fit`), then differentiates its loss on any dev features (`gradient`)."""

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        max_steps: int = 10,
        tolerance: float = 1e-3,
        init_std: float = 0.02,
        stop_on_device: Optional[bool] = None,
    ) -> None:
        if max_steps < 1:
            raise ValueError(f"dev_head_steps must be >= 1, got {max_steps}")
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.tolerance = tolerance
        self.init_std = init_std
        #: decide the early stop on the device (see `fit`); None: wherever the features are not on the CPU
        self.stop_on_device = stop_on_device
        #: the head fitted by the last `fit`; a plain attribute, so it never enters a module's state_dict
        self.head: Optional[ClassificationHead] = None

    def fit(self, features: Union[Tensor, Callable[[], Tensor]], labels: Tensor, seed: int) -> None:
        """Fit a fresh head on `features`: AdamW, stopped early once the loss moves less than `tolerance`.

        On an accelerator, cached features (a tensor) are fitted without reading anything back to the host: every
        one of `max_steps` steps runs, and once the loss has settled the learning rate, a tensor on the device, is
        zero, so the head is the one an early stop leaves, without the host waiting for the device at every step.
        On the CPU a read waits for nothing, and a callable (re-encoding at every step, the paper's code) would
        re-run the encoder at every extra step: both stop on the host. The optimizer is the fused AdamW, one kernel
        per step instead of one per parameter and operation (at the head's size, launches are the step's cost), on
        the devices torch has it for.
        The head is fitted in fp32 with autocast off, whatever the training step's precision: inside a
        mixed-precision step, autocast reuses the low-precision copy it made of a weight until its context exits, so
        every fitting step would see the head's initial weights. (The head is small: fp32 costs nothing measurable.)
        `seed` fixes the head's initialisation, so every DDP rank (and a resumed run) fits the same head.
        """
        device = labels.device
        head = ClassificationHead(self.hidden_size, self.num_labels, dropout=0.0)
        head.reset_parameters(self.init_std, torch.Generator().manual_seed(seed))
        # fp32 also where the step's default dtype is lower (`bf16-true`); a blocking copy would wait for the device
        head.to(device, torch.float32, non_blocking=True)
        lr = torch.full((), self.lr, device=device)  # filled on the device: a copy from the host would wait for it
        # the fused AdamW where torch has one for the device, else the single-tensor one (the multi-tensor one takes no
        # tensor lr)
        kernel = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": False}
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=self.weight_decay, **kernel)
        cached = isinstance(features, Tensor)
        if cached:
            features = features.float()
        stop_on_device = self.stop_on_device if self.stop_on_device is not None else device.type != "cpu"
        on_device = cached and stop_on_device
        previous: Optional[Tensor] = None
        with torch.enable_grad():
            for _ in range(self.max_steps):
                inputs = features if cached else features().float()  # re-encoding runs in the step's precision
                with torch.autocast(device.type, enabled=False):  # forward, backward and update in fp32
                    loss = F.cross_entropy(head(inputs), labels)
                    if previous is not None:
                        settled = (previous - loss.detach()).abs() < self.tolerance
                        if not on_device and settled.item():
                            break
                        lr.masked_fill_(settled, 0.0)  # settled stays settled: no later step moves the head
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    previous = loss.detach()
        self.head = head.requires_grad_(False)

    def gradient(
        self,
        features: Tensor,
        labels: Tensor,
        params: Sequence[nn.Parameter],
        scale_loss: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> list[Tensor]:
        """Gradient of the fitted head's loss on `features` (computed with a graph) w.r.t. each of `params`, fp32.

        `scale_loss` (fp16's loss scaling) multiplies the loss before differentiation so fp16 gradients do not
        underflow; only the direction of the result is used.
        """
        if self.head is None:
            raise RuntimeError("DevHead.gradient() before fit()")
        loss = F.cross_entropy(self.head(features.float()).float(), labels)  # the encoder's dtype to the head's
        if scale_loss is not None:
            loss = scale_loss(loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [(g if g is not None else torch.zeros_like(p)).float() for g, p in zip(grads, params)]
