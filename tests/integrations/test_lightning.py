"""Real short runs inside Lightning: configure_optimizers returns an lrtrain optimizer built from
module names; Lightning's accumulation, clipping and step-wise scheduler give the very weights of a
hand-written loop, and its checkpoints resume bit for bit."""

import lightning
import pytest
import torch
from torch import nn

from lrtrain.optim import ApolloAdamW, FiraAdamW, FrugalAdamW, GaLoreAdamW, param_groups
from tests.conftest import TinyLM
from tests.tolerance import SEED

ACCUMULATE, CLIP, STEPS = 2, 0.5, 6


def _optimizer(model: nn.Module, cls) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = cls(param_groups(model, target_modules=["attn", "mlp"], rank=4, update_proj_gap=2,
                                 no_decay=("bias", "norm")), lr=1e-2, weight_decay=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).flatten(0, 1)
    return nn.functional.cross_entropy(logits, tokens[:, 1:].flatten())


class LitTinyLM(lightning.LightningModule):
    def __init__(self, cls):
        super().__init__()
        torch.manual_seed(SEED)
        self.model, self.cls, self.batches = TinyLM(), cls, _batches()

    def training_step(self, index, batch_idx):
        # The data of a step is chosen by its position: Lightning restarts a plain DataLoader from the
        # start of its epoch when it resumes (resuming the data is a stateful loader's job, not ours).
        return _loss(self.model, self.batches[batch_idx])

    def configure_optimizers(self):
        optimizer, scheduler = _optimizer(self.model, self.cls)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _batches():
    generator = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(0, 32, (4, 9), generator=generator) for _ in range(ACCUMULATE * STEPS)]


def _fit(cls, root, max_steps=STEPS, ckpt_path=None, every=None) -> LitTinyLM:
    module = LitTinyLM(cls)
    callbacks = ([lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every,
                                                              save_top_k=-1)] if every else [])
    trainer = lightning.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                                enable_checkpointing=bool(every), accumulate_grad_batches=ACCUMULATE,
                                gradient_clip_val=CLIP, default_root_dir=root)
    loader = torch.utils.data.DataLoader(range(ACCUMULATE * STEPS), batch_size=None)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("cls", [GaLoreAdamW, FrugalAdamW, ApolloAdamW])
def test_lightning_trains_as_a_hand_written_loop(tmp_path, cls):
    fitted = _fit(cls, tmp_path)
    torch.manual_seed(SEED)
    model = TinyLM()
    optimizer, scheduler = _optimizer(model, cls)
    batches = _batches()
    for step in range(STEPS):
        for tokens in batches[step * ACCUMULATE:(step + 1) * ACCUMULATE]:
            (_loss(model, tokens) / ACCUMULATE).backward()
        # Lightning clips the optimizer's parameters, in the order of its groups
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], CLIP)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    for (name, p), q in zip(model.named_parameters(), fitted.model.parameters()):
        assert torch.equal(q, p), name  # the same operations in the same order


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW])
def test_lightning_checkpoints_resume_bit_for_bit(tmp_path, cls):
    straight = _fit(cls, tmp_path / "straight")
    _fit(cls, tmp_path / "first", max_steps=3, every=3)
    (checkpoint,) = (tmp_path / "first").glob("*step=3.ckpt")
    resumed = _fit(cls, tmp_path / "second", ckpt_path=str(checkpoint))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
