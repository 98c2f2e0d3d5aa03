"""Hugging Face ``transformers.Trainer`` with lrtrain's optimizers.

Trainer builds its optimizer from anonymous parameter lists (``optimizer_cls_and_kwargs`` gets a
decay and a no-decay group, no module names), so a subspace optimizer handed over that way has no
group to project and trains plain AdamW. Build it from the model instead and pass it in::

    optimizer = create_optimizer(model, args, GaLoreAdamW, target_modules=["q_proj", "v_proj"], rank=128)
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), train_dataset=...)

Layer-wise updates (each parameter steps inside the backward pass and its gradient is freed at
once): the same optimizer, ``LayerwiseTrainer`` in place of ``Trainer``. Its ``max_grad_norm`` and
logged ``grad_norm`` are those of :class:`lrtrain.optim.LayerwiseUpdates` (Trainer's own clipping
would find no gradients left: it would clip nothing and log 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import transformers
from torch import nn

from ..optim import GaLoreAdafactor, GaLoreAdamW, LayerwiseUpdates, SubspaceAdamW, param_groups

NO_DECAY = ("bias", "norm")  # HF's no-decay split: biases, LayerNorm / RMSNorm weights


def create_optimizer(
    model: nn.Module,
    args: transformers.TrainingArguments,
    optimizer_cls: type[SubspaceAdamW] = GaLoreAdamW,
    *,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    no_decay: Iterable[str] = NO_DECAY,
    **group_keys: Any,
) -> SubspaceAdamW:
    """One of lrtrain's optimizers for ``model``, set from ``args`` as Trainer sets its own.

    The ``nn.Linear`` weights that ``target_modules`` selects train in subspaces (``group_keys``:
    ``rank``, ``update_proj_gap``, ``scale``, ...; see :func:`lrtrain.optim.param_groups`); the
    parameters whose names contain a ``no_decay`` part train without weight decay. ``lr``,
    ``weight_decay``, ``betas`` and ``eps`` are ``args.learning_rate``, ``args.weight_decay``,
    ``(args.adam_beta1, args.adam_beta2)`` and ``args.adam_epsilon`` (HF's built-in
    ``galore_adamw`` keeps galore-torch's ``eps=1e-6`` and no weight decay whatever ``args`` say;
    ``TrainingArguments(adam_epsilon=1e-6, weight_decay=0.0)`` trains as it does). GaLore-Adafactor
    takes ``args.learning_rate`` as a fixed lr without parameter scaling, as HF sets it.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, SubspaceAdamW)):
        raise TypeError(f"optimizer_cls must be one of lrtrain's optimizers (a SubspaceAdamW subclass); "
                        f"got {optimizer_cls!r}")
    groups = param_groups(model, target_modules, no_decay=no_decay, **group_keys)
    if issubclass(optimizer_cls, GaLoreAdafactor):
        return optimizer_cls(groups, lr=args.learning_rate, relative_step=False, scale_parameter=False,
                             weight_decay=args.weight_decay)
    return optimizer_cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         eps=args.adam_epsilon, weight_decay=args.weight_decay)


class LayerwiseTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose lrtrain optimizer (``optimizers=(optimizer, scheduler)``)
    updates each parameter inside the backward pass (:class:`lrtrain.optim.LayerwiseUpdates`).

    Gradient accumulation follows ``args.gradient_accumulation_steps`` (the parameters step in the
    last micro-batch of each step, also in a short last accumulation of an epoch); ``max_grad_norm``
    clips each step with the previous step's norm; the logged ``grad_norm`` is the step's own norm.
    Not supported: several processes (use lrtrain's loop, whose DDP hook steps each bucket) and
    fp16 loss scaling (the gradients are used before a scaler could unscale them; use bf16).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.optimizer, SubspaceAdamW):
            raise TypeError("LayerwiseTrainer needs one of lrtrain's optimizers passed as optimizers=(optimizer, "
                            "None): build it with lrtrain.integrations.hf.create_optimizer(model, args, ...)")
        if self.args.world_size > 1:
            raise ValueError("LayerwiseTrainer runs in one process; under torchrun use lrtrain's training loop "
                             "(train.layerwise=true), whose DDP communication hook updates each bucket")
        if self.args.fp16:
            raise ValueError("LayerwiseTrainer cannot use fp16 loss scaling (each gradient is applied during the "
                             "backward pass, before a scaler could unscale it): use bf16=True")
        for hook in ("_clip_grad_norm", "_get_grad_norm"):
            if not callable(getattr(transformers.Trainer, hook, None)):
                raise RuntimeError(f"transformers {transformers.__version__} has no Trainer.{hook}, which "
                                   "LayerwiseTrainer replaces; use the transformers version of requirements.lock")
        self.layerwise = LayerwiseUpdates(self.optimizer, grad_accum=self.args.gradient_accumulation_steps,
                                          max_grad_norm=self.args.max_grad_norm or None)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        # Trainer marks the last micro-batch of each step before running it; it then calls
        # optimizer.step() itself, which finds every gradient consumed and updates nothing.
        with self.layerwise.micro_batch(last=self.accelerator.sync_gradients, step_optimizer=False):
            return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        return torch.tensor(self.layerwise.last_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> float:
        return self.layerwise.last_grad_norm
