"""Real short runs inside Hugging Face's Trainer: lrtrain's optimizers train in subspaces (as HF's
built-in galore_adamw does), resume bit for bit, and step layer-wise with working clipping."""

import pytest
import torch
import transformers

from lrtrain.integrations.hf import LayerwiseTrainer, create_optimizer
from lrtrain.optim import FiraAdamW, GaLoreAdafactor, GaLoreAdamW, describe
from tests.tolerance import SEED

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GALORE = {"rank": 4, "update_proj_gap": 2, "scale": 0.25}


def _model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _dataset(n=24, length=17):
    generator = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.randint(0, 64, (n, length), generator=generator)
    return [{"input_ids": t, "labels": t} for t in tokens]


def _args(out, **overrides) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2,
                    lr_scheduler_type="constant", adam_epsilon=1e-6, weight_decay=0.0, max_grad_norm=0.0,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                    seed=SEED, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**settings, **overrides})


def _train(trainer_cls=transformers.Trainer, optimizer_cls=GaLoreAdamW, *, out, resume=None, model=None,
           **overrides):
    model = model or _model()
    args = _args(out, **overrides)
    optimizer = create_optimizer(model, args, optimizer_cls, target_modules=TARGETS, **GALORE)
    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_trains_in_subspaces_as_hf_galore_does(tmp_path):
    """Built from module names, GaLoreAdamW projects the chosen layers; its losses are those of HF's
    built-in optim="galore_adamw" (galore-torch) with the same settings."""
    ours = _train(out=tmp_path / "ours")
    table = describe(ours.optimizer.optimizer if hasattr(ours.optimizer, "optimizer") else ours.optimizer)
    assert table.count("svd + none") == 2 * len(TARGETS)  # every target matrix has a subspace, nothing else
    theirs = transformers.Trainer(model=_model(), train_dataset=_dataset(), args=_args(
        tmp_path / "hf", optim="galore_adamw", optim_target_modules=TARGETS,
        optim_args=",".join(f"{k}={v}" for k, v in GALORE.items())))
    theirs.train()
    ours_loss, theirs_loss = _logged(ours, "loss"), _logged(theirs, "loss")
    assert len(ours_loss) == 6
    # measured (seeds 0-2, 1-2 threads): at most 4.8e-7 apart, one float32 ulp at 4.2; bound 4x that
    torch.testing.assert_close(torch.tensor(ours_loss), torch.tensor(theirs_loss), rtol=0, atol=2e-6)


@pytest.mark.parametrize("trainer_cls, optimizer_cls", [
    (transformers.Trainer, GaLoreAdamW), (transformers.Trainer, GaLoreAdafactor), (LayerwiseTrainer, FiraAdamW)])
def test_resumes_bit_for_bit(tmp_path, trainer_cls, optimizer_cls):
    """Trainer's checkpoints (optimizer.pt loaded with weights_only=True) continue exactly."""
    straight = _train(trainer_cls, optimizer_cls, out=tmp_path / "straight")
    _train(trainer_cls, optimizer_cls, out=tmp_path / "first", save_strategy="steps", save_steps=3, max_steps=3)
    resumed = _train(trainer_cls, optimizer_cls, out=tmp_path / "first",
                     resume=str(tmp_path / "first" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_layerwise_trainer_matches_the_ordinary_step_and_logs_the_norm(tmp_path, tolerance):
    """With accumulation and no clipping, layer-wise steps train as Trainer's ordinary step does. The
    logged norm is that of the gradients applied (Trainer's own would be 0: every gradient is freed in
    backward): the full gradients' in refresh steps, where it equals the ordinary step's, and in the
    steps between, for the GaLore matrices, the norm of their projection P^T G, which is no larger."""
    plain = _train(out=tmp_path / "plain", gradient_accumulation_steps=2)
    layerwise = _train(LayerwiseTrainer, out=tmp_path / "layerwise", gradient_accumulation_steps=2)
    loss_gap = (torch.tensor(_logged(layerwise, "loss")) - torch.tensor(_logged(plain, "loss"))).abs().max()
    # measured (seeds 0-2, 1-2 threads): equal; the bound allows a float32 ulp or two of reordering
    tolerance.below("layer-wise vs ordinary loss", float(loss_gap), 1e-6)
    norms, full = torch.tensor(_logged(layerwise, "grad_norm")), torch.tensor(_logged(plain, "grad_norm"))
    refresh, between = slice(0, None, 2), slice(1, None, 2)  # update_proj_gap=2: refreshes at steps 0, 2, 4
    # measured: refresh-step norms equal; between them the ratio is 0.956-0.985
    torch.testing.assert_close(norms[refresh], full[refresh], rtol=1e-6, atol=0)
    ratio = norms[between] / full[between]
    assert bool((ratio < 1).all())  # ‖P^T G‖ <= ‖G‖ for orthonormal P
    tolerance.above("projected / full norm", float(ratio.min()), 0.5)


def test_layerwise_trainer_clips_with_the_previous_norm(tmp_path, tolerance):
    """max_grad_norm acts: the first step is not clipped (its loss after it is the unclipped run's), the
    second is clipped by the first step's norm, so the third loss differs."""
    free = _train(LayerwiseTrainer, out=tmp_path / "free", max_steps=3)
    clipped = _train(LayerwiseTrainer, out=tmp_path / "clipped", max_steps=3, max_grad_norm=1e-3)
    free_loss, clipped_loss = _logged(free, "loss"), _logged(clipped, "loss")
    assert free_loss[:2] == clipped_loss[:2]
    tolerance.above("clipped third loss gap", abs(free_loss[2] - clipped_loss[2]), 1e-3)  # measured >= 5.3e-3
    assert _logged(clipped, "grad_norm")[0] == _logged(free, "grad_norm")[0] > 1e-3


def test_optimizer_cls_and_kwargs_warns_that_it_trains_plain_adamw(tmp_path):
    """Trainer's own groups carry no module names: the optimizer says so and names the fix."""
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(),
                                   optimizer_cls_and_kwargs=(GaLoreAdamW, {"lr": 1e-2}))
    with pytest.warns(UserWarning, match="create_optimizer"):
        trainer.create_optimizer()


def test_layerwise_trainer_refuses_what_it_cannot_do(tmp_path):
    model = _model()
    args = _args(tmp_path)
    with pytest.raises(TypeError, match="create_optimizer"):
        LayerwiseTrainer(model=model, args=args, train_dataset=_dataset(),
                         optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="optimizer_cls"):
        create_optimizer(model, args, torch.optim.AdamW, target_modules=TARGETS)
