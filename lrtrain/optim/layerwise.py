"""Layer-wise updates (the optimizer in the backward pass): each parameter is updated as soon as
its gradient is complete, and the gradient is freed at once, so the full set of gradients never
exists at one time (GaLore's "per-layer weight updates").

Unlike the per-parameter optimizers of the references, this drives one real optimizer — its
``state_dict``, learning-rate schedulers and ``describe`` work as usual — and it respects gradient
accumulation: parameters step only in the last micro-batch of a step (the references step on every
micro-batch: GaLore issue #78). Between micro-batches a parameter under GaLore's rule folds its
gradient into the low-rank accumulator of its subspace and frees the full gradient, unless the next
step refreshes the subspace (the SVD needs the whole accumulated gradient); Fira's and FRUGAL's
rules read the full gradient, so those accumulate it whole, as ordinary training does.

Clipping: a step's global gradient norm is known only after its backward pass, when most
parameters have been updated already, so ``max_grad_norm`` clips each step with the norm of the
*previous* step (the first step is not clipped): ``g ← g · min(1, max_grad_norm / ‖g_{t-1}‖)``.
The squared norms add up in a float64 tensor on the gradients' device, so the backward pass never
waits for the host; the host reads the norm once per step.
The norm logged (``last_grad_norm``) is that of the gradients as they were applied, before
clipping; for parameters that accumulated in their subspace it counts the projected gradient.

Under DDP the steps run in a DDP communication hook, after each bucket's all-reduce
(:meth:`LayerwiseUpdates.attach_ddp`); DDP keeps its gradient buckets, so there the saving is the
time of the overlap, not the gradients' memory. FSDP2 is not supported.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from .subspace import SubspaceAdamW, is_projected


class LayerwiseUpdates:
    """Drive ``optimizer`` from post-accumulate-grad hooks::

        layerwise = LayerwiseUpdates(optimizer, grad_accum=4, max_grad_norm=1.0)
        for micro, batch in enumerate(micro_batches):
            with layerwise.micro_batch(micro):
                loss_fn(model(batch)).backward()   # parameters step inside the last backward
        scheduler.step()

    ``ddp=True``: the model will be wrapped in DDP; call :meth:`attach_ddp` with the wrapper, and
    use ``ddp_model.no_sync()`` for the micro-batches before the last.
    """

    def __init__(self, optimizer: SubspaceAdamW, grad_accum: int = 1, max_grad_norm: float | None = None,
                 ddp: bool = False):
        if not isinstance(optimizer, SubspaceAdamW):
            raise TypeError(f"layer-wise updates need one of lrtrain's optimizers (it steps one parameter at a "
                            f"time through step_param); got {type(optimizer).__name__}")
        if any(is_projected(g) and g["proj_method"] == "blocks" for g in optimizer.param_groups):
            raise ValueError("proj_method='blocks' reselects whole tensors per group: use the ordinary step for it")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1; got {grad_accum}")
        self.optimizer, self.grad_accum, self.max_grad_norm = optimizer, grad_accum, max_grad_norm
        self.last_grad_norm = 0.0
        self._boundary = grad_accum == 1
        self._norm_sq: Tensor | float = 0.0  # a device tensor once a gradient has been counted
        self._coef: Tensor | None = None  # the clipping factor, a device tensor (None: no clipping)
        self._ddp = ddp
        if not ddp:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.register_post_accumulate_grad_hook(self._on_gradient)

    def attach_ddp(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Update each DDP bucket's parameters as soon as its all-reduce has averaged them."""
        ddp_model.register_comm_hook(ddp_model.process_group, self._all_reduce_then_update)

    def _all_reduce_then_update(self, group, bucket):  # no annotations: DDP checks them against live types
        """DDP's communication hook: a future of the averaged bucket, whose parameters it has updated."""
        world = dist.get_world_size(group)
        future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()

        def update(done: torch.futures.Future) -> Tensor:
            buffer = done.value()[0].div_(world)
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                p.grad = grad
                self.update(p)
            return buffer

        return future.then(update)

    @contextmanager
    def micro_batch(self, index: int | None = None, *, last: bool | None = None, step_optimizer: bool = True):
        """Run the backward pass of micro-batch ``index`` (0 .. grad_accum - 1) inside this, or tell
        whether it is the ``last`` of its step (a loop that knows, such as HF Trainer, whose last
        accumulation of an epoch may be short). ``step_optimizer=False``: the loop calls
        ``optimizer.step()`` itself after the last micro-batch (it updates nothing: see below)."""
        if (index is None) == (last is None):
            raise ValueError("micro_batch takes exactly one of the micro-batch's index and last=True/False")
        self._boundary = index == self.grad_accum - 1 if last is None else bool(last)
        yield
        if self._boundary:  # the step is complete: its norm clips the next one
            norm = torch.as_tensor(self._norm_sq, dtype=torch.float64).sqrt()
            self.last_grad_norm = float(norm)  # the step's one host read
            if self.max_grad_norm:
                self._coef = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0)
            self._norm_sq = 0.0
            if self._ddp:  # DDP copies the averaged buckets back into .grad; they have been applied
                self.optimizer.zero_grad(set_to_none=True)
            # Every gradient was consumed (and freed) in the backward pass, so this updates nothing;
            # it is the step as schedulers and step hooks see it.
            if step_optimizer:
                self.optimizer.step()

    def discard(self) -> None:
        """Forget the micro-batches of an abandoned step (a non-finite loss before the last
        backward pass): the gradients accumulated whole and those folded into subspaces."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
                self.optimizer.state.get(p, {}).pop("low_rank_grad", None)
        self._norm_sq = 0.0

    def _on_gradient(self, p: Tensor) -> None:
        if self._boundary:
            self.update(p)
        else:
            self.optimizer.accumulate_low_rank_(p)  # otherwise the gradient accumulates whole

    def update(self, p: Tensor) -> None:
        """Clip (with the previous step's norm), step and free one parameter's gradient."""
        for tensor in (p.grad, self.optimizer.state.get(p, {}).get("low_rank_grad")):
            if tensor is None:
                continue
            self._norm_sq = self._norm_sq + _squared_norm(tensor)
            if self._coef is not None:
                tensor.mul_(self._coef.to(tensor.device))
        self.optimizer.step_param(p)
        p.grad = None


def _squared_norm(tensor: Tensor) -> Tensor:
    """‖tensor‖² as a float64 0-d tensor on its device: the norm accumulated in float32 or better,
    without a float32 copy of a bf16 gradient."""
    norm = torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32))
    return norm.to(torch.float64).square()
