"""The pretraining harness end to end: hydra configs, the loop on the embedded corpus, exact
resume, memory metrics against the analytic count, a real sweep and its report."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from lrtrain.models import LLAMA_SIZES
from lrtrain.optim.projector import projection_side
from lrtrain.train.checkpoint import checkpoints
from lrtrain.train.run import build_trainer, run
from tests.tolerance import SEED

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = ["adamw", "galore", "fira", "frugal", "apollo", "apollo_mini", "galore_adafactor"]
METHODS = [*OPTIMIZERS, "sltrain", "sst"]
TINY = ["logger=none", "train.steps=8", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=1",
        "train.eval_every=4", "train.eval_batches=2", "train.log_every=1", "train.progress=false"]


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.sweep_name = None
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", sorted(LLAMA_SIZES))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_model_and_optimizer_composes(model, optimizer, cache_dir):
    """Every optimizer config on every model size; the methods (optimizer + parameterization) too."""
    cfg = config(f"model={model}", f"optimizer={optimizer}")
    assert cfg["model"]["size"] == model and cfg["optimizer"]["name"] == optimizer
    assert cfg["run_name"] == f"{model}-{optimizer}-dense"
    if optimizer in ("galore", "fira"):
        assert cfg["optimizer"]["rank"] == cfg["model"]["recipe"]["rank"] == {"llama_tiny": 32, "llama_20m": 64, "llama_60m": 128, "llama_130m": 256,
                                            "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}[model]


@pytest.mark.parametrize("method", METHODS)
def test_methods_choose_optimizer_and_parameterization(method, cache_dir):
    cfg = config(f"method={method}")
    param = method if method in ("sltrain", "sst") else "dense"
    assert (cfg["optimizer"]["name"], cfg["param"]["kind"]) == ("adamw" if param != "dense" else method, param)
    if param != "dense":
        assert cfg["param"]["rank"] == 32 and cfg["param"]["target_modules"] == ["attn", "mlp"]
    if param == "sltrain":  # the reference's scale alpha/rank = 0.25 at 60M; llama_tiny keeps it
        assert cfg["param"]["alpha"] / cfg["param"]["rank"] == 0.25 and cfg["param"]["sparsity"] == 0.03


@pytest.mark.parametrize("name", ["galore_60m", "galore_130m", "fira_60m", "fira_130m", "cpu_compare"])
def test_experiments_compose(name, cache_dir):
    cfg = config(f"experiment={name}")
    if name == "cpu_compare":
        assert cfg["model"]["size"] == "llama_tiny" and cfg["data"]["source"] == "shakespeare"
        return
    size = name.split("_")[1]
    assert cfg["model"]["size"] == f"llama_{size}" and cfg["data"]["source"] == "c4"
    assert cfg["optimizer"]["name"] == name.split("_")[0] and cfg["optimizer"]["lr"] == 0.01
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["seq_len"] == 256
    assert cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] == 512
    assert cfg["train"]["steps"] == {"60m": 10_000, "130m": 20_000}[size]


def test_unknown_keys_are_refused(cache_dir, tmp_path):
    with pytest.raises(ConfigCompositionException, match="rnk"):
        config("optimizer=galore", "optimizer.rnk=3")
    # appended with +, it reaches the optimizer, which names the key it resembles, before training
    with pytest.raises(ValueError, match="did you mean 'rank'"):
        build_trainer(config("optimizer=galore", "+optimizer.rnk=3", *TINY), tmp_path)


@pytest.mark.parametrize(
    "override,match",
    [("train.precision=fp16", "train.precision must be one of"), ("optimizer=galore", None),
     ("train.warmup_steps=8", "warmup_steps"), ("model.size=llama_3m", "unknown LLaMA size"),
     ("optimizer.name=sgd", "optimizer.name must be one of"), ("param.kind=lora", "kind must be one of"),
     ("param=sltrain", "rank"),
     ("device=cuda", "CUDA is not available"), ("train.batch_size=0", "train.batch_size"),
     ("optimizer.lr=fast", "optimizer.lr must be a number; got 'fast'"),
     ("train.grad_clip=high", "train.grad_clip must be a number; got 'high'"),
     ("optimizer.betas=[0.9]", r"optimizer.betas must be a pair \[beta1, beta2\]; got \[0.9\]"),
     ("seed=1.5", "seed must be an integer; got 1.5"), ("train.steps=true", "train.steps must be an integer >= 1; got True"),
     ("train.on_nonfinite=ignore", "train.on_nonfinite must be one of raise, skip")],
)
def test_bad_values_fail_before_training(override, match, cache_dir, tmp_path):
    overrides = [*TINY, override]
    if match is None:  # rank 0 for a subspace optimizer: the optimizer refuses it
        overrides, match = [*TINY, "optimizer=galore", "optimizer.rank=0"], "rank must be an integer >= 1"
    if override == "param=sltrain":  # rank as large as the hidden size: SLTrain refuses it
        overrides = [*TINY, override, "param.rank=128"]
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    with pytest.raises(ValueError, match=match):
        build_trainer(config(*overrides), tmp_path)
    assert not checkpoints(tmp_path / "checkpoints")


@pytest.mark.parametrize("content,split,match", [
    (bytes(range(256)) * 16, "train", r"files\['train'\]: '.*model.bin.txt' is not a text file \(it contains NUL bytes\)"),
    (b"", "validation", r"files\['validation'\] holds no text \(.*model.bin.txt\)")])
def test_bad_data_files_fail_before_training(content, split, match, cache_dir, tmp_path):
    bad, good = tmp_path / "model.bin.txt", tmp_path / "good.txt"
    bad.write_bytes(content)
    good.write_text("Friends, Romans, countrymen, lend me your ears.\n" * 100)
    files = {"train": bad, "validation": good} if split == "train" else {"train": good, "validation": bad}
    with pytest.raises(ValueError, match=match):
        build_trainer(config(*TINY, "data=files", f"data.files.train=[{files['train']}]",
                             f"data.files.validation=[{files['validation']}]"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_on_the_corpus(method, cache_dir, tmp_path, tolerance):
    # Adafactor's relative step scales by RMS(W) (0.02 at init): too slow for 40 steps; a fixed lr here.
    fixed_lr = ["optimizer.relative_step=false", "optimizer.scale_parameter=false", "optimizer.lr=0.01"]
    summary = run(config(f"method={method}", f"seed={SEED}", *TINY, "train.steps=40", "train.seq_len=64", "train.batch_size=8",
                         "train.warmup_steps=4", "train.eval_every=0", "model.recipe.update_proj_gap=10",
                         *(fixed_lr if method == "galore_adafactor" else [])), tmp_path)
    losses = [m["train/loss"] for m in _metrics(tmp_path)]
    # random init: uniform over the vocabulary
    tolerance.below("|first loss - log(vocab)|", abs(losses[0] - math.log(4096)), 0.3)
    # audited (3 seeds x 1, 2 threads): the smallest drop is 1.62 (SST); the floor keeps a 2x margin
    tolerance.above("train loss drop (mean of the last 5 steps)", losses[0] - sum(losses[-5:]) / 5, 0.75)
    tolerance.above("validation loss below the first train loss", losses[0] - summary["val/loss"], 0.75)
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/loss"]))
    assert (tmp_path / "run.json").exists() and checkpoints(tmp_path / "checkpoints")


@pytest.mark.parametrize("method", ["adamw8bit", "galore8bit", "galore8bit_layerwise"])
def test_8_bit_methods_quantize_every_group_and_learn(method, cache_dir, tmp_path):
    """The memory-frontier methods: 8-bit moments for the plain group too (embeddings, head, norms
    below 4096 elements stay float32), per-layer updates where asked, and the loss falls."""
    cfg = config(f"method={method}", *TINY, "train.steps=40", "train.seq_len=64", "train.batch_size=8",
                 "train.warmup_steps=4", "train.eval_every=0", "model.recipe.update_proj_gap=10")
    trainer = build_trainer(cfg, tmp_path)
    assert (trainer.layerwise is not None) == method.endswith("layerwise")
    trainer.fit()
    embedding = trainer.optimizer.state[trainer.model.get_input_embeddings().weight]
    assert embedding["state1" if method == "adamw8bit" else "exp_avg"].dtype == torch.uint8
    losses = [m["train/loss"] for m in _metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses


@pytest.mark.parametrize("method", ["galore", "frugal", "sst"])
def test_resume_equals_the_uninterrupted_run(method, cache_dir, tmp_path):
    cfg = config(f"method={method}", *TINY, "train.steps=10", "train.checkpoint_every=4",
                 "model.recipe.update_proj_gap=3")
    whole = build_trainer(cfg, tmp_path / "whole")
    whole.fit()
    whole.close()
    interrupted = build_trainer(cfg, tmp_path / "cut")
    interrupted.fit(until_step=6)  # dies after step 6; its last checkpoint is step 4
    interrupted.close()
    resumed = build_trainer(cfg, tmp_path / "cut")
    assert resumed.step == 4
    resumed.fit()
    resumed.close()
    keys = ("train/loss", "train/grad_norm", "lr")
    a, b = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(1, 11))
    assert [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]
    assert [m.get("val/loss") for m in a] == [m.get("val/loss") for m in b]
    for p, q in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_parameterization_with_a_subspace_optimizer(cache_dir, tmp_path):
    """SLTrain MLPs with GaLore on the attention, composed from the config groups."""
    trainer = build_trainer(config("optimizer=galore", "param=sltrain", "param.target_modules=[mlp]",
                                   "optimizer.target_modules=[self_attn]", *TINY, "train.steps=3"), tmp_path)
    assert len(trainer.optimizer.param_groups[1]["params"]) == 4 * LLAMA_SIZES["llama_tiny"]["num_hidden_layers"]
    trainer.fit()
    assert all(math.isfinite(m["train/loss"]) for m in _metrics(tmp_path))


def test_finished_run_is_not_trained_again(cache_dir, tmp_path, capsys):
    first = run(config(*TINY, "train.steps=3"), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text()
    again = run(config(*TINY, "train.steps=3"), tmp_path)
    assert again == json.loads(json.dumps(first)) and "finished already" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_resume_with_another_config_is_refused(cache_dir, tmp_path):
    run(config(*TINY, "train.steps=3"), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        build_trainer(config(*TINY, "train.steps=3", "optimizer.lr=0.5"), tmp_path)
    build_trainer(config(*TINY, "train.steps=3", "train.log_every=2"), tmp_path)  # cadence may change


def test_memory_metrics_match_the_analytic_count(cache_dir, tmp_path):
    rank = 8
    trainer = build_trainer(config("optimizer=galore", f"optimizer.rank={rank}", *TINY, "train.steps=2"), tmp_path)
    trainer.fit()
    last = _metrics(tmp_path)[-1]
    params = list(trainer.model.parameters())
    n_params = sum(p.numel() for p in params)
    assert last["memory/params_gib"] * 2**30 == n_params * 4
    assert last["memory/grads_gib"] * 2**30 == n_params * 4
    assert last["memory/buffers_gib"] * 2**30 == sum(b.numel() * b.element_size() for b in trainer.model.buffers())
    expected_state = 0
    for name, p in trainer.model.named_parameters():
        if p.dim() == 2 and ("attn" in name or "mlp" in name):
            m, n = p.shape
            side = projection_side((m, n), "std")
            expected_state += 4 * (2 * rank * (m if side == "right" else n) + rank * (n if side == "right" else m))
        else:
            expected_state += 4 * 2 * p.numel()  # AdamW moments
        expected_state += 4  # step
    assert last["memory/optimizer_state_gib"] * 2**30 == expected_state
    # the measured peak holds at least weights, gradients and state, and the logits of a batch
    floor = 2 * n_params * 4 + expected_state + 4 * 32 * trainer.data.vocab_size * 4
    assert floor < last["memory/peak_gib"] * 2**30 < floor + 64 * 2**20


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_mixed_and_pure_bf16(precision, cache_dir, tmp_path):
    trainer = build_trainer(config("optimizer=fira", *TINY, "train.steps=3", f"train.precision={precision}"), tmp_path)
    trainer.fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(p.dtype == expected for p in trainer.model.parameters())
    assert all(math.isfinite(m["train/loss"]) for m in _metrics(tmp_path))


def test_transformers_model_source(cache_dir, tmp_path):
    pytest.importorskip("transformers")
    trainer = build_trainer(config("optimizer=galore", "model.source=transformers", *TINY, "train.steps=3"), tmp_path)
    assert type(trainer.model).__module__.startswith("transformers")
    trainer.fit()
    assert len(trainer.optimizer.param_groups[1]["params"]) == 7 * LLAMA_SIZES["llama_tiny"]["num_hidden_layers"]


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in a (DCP) checkpoint directory, whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=True)["model"]


def _launch(args: list[str], env: dict, nproc: int = 1) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    done = subprocess.run([*launcher, "scripts/pretrain.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"pretrain.py {args} failed:\n{done.stderr[-5000:]}")


def _env(cache_dir):
    return {**os.environ, "WANDB_MODE": "disabled", "LRTRAIN_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def _compare_runs(one: Path, two: Path, steps: int, tol: float = 1e-9) -> None:
    """Losses and final weights of two float64 runs agree to ``tol``. (In fp32 the same comparison
    is meaningless: one process at 1 vs 2 threads already differs by 5e-4 in the loss after 6 steps,
    because Adam turns rounding-level gradients of rarely seen embedding rows into whole steps.)"""
    a, b = _metrics(one), _metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for key in ("train/loss", "val/loss"):
        got, want = [m.get(key) for m in b], [m.get(key) for m in a]
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], rel=tol)
    final = f"step-{steps:08d}"
    weights_a, weights_b = checkpoint_weights(one / "checkpoints" / final), checkpoint_weights(two / "checkpoints" / final)
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=tol, atol=tol)


RUN = "llama_tiny-galore-dense"


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(cache_dir, tmp_path):
    """Two gloo processes with half the rows each train like one process with the whole batch."""
    common = ["optimizer=galore", *TINY, "train.steps=6", "train.grad_accum=2", "model.recipe.update_proj_gap=3",
              "train.precision=fp64", CANONICAL]
    _launch([*common, "train.batch_size=4", f"output_root={tmp_path / 'one'}"], _env(cache_dir))
    _launch([*common, "train.batch_size=2", f"output_root={tmp_path / 'two'}"], _env(cache_dir), nproc=2)
    _compare_runs(tmp_path / "one" / "runs" / RUN, tmp_path / "two" / "runs" / RUN, steps=6)


FSDP = ["distributed=fsdp2", "distributed.param_dtype=null", "distributed.reduce_dtype=null"]
# GaLore and Fira keep their moments across refreshes, so the signs of the SVD's singular vectors
# matter; LAPACK picks them discontinuously (gradients 1e-18 apart can get opposite signs), and
# process layouts differ in the gradients' last bits. Canonical signs make layouts comparable.
CANONICAL = "optimizer.basis_signs=canonical"


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("galore", ["model.recipe.update_proj_gap=3", CANONICAL]),
                                          ("frugal", ["optimizer.block_order=random", "model.recipe.update_proj_gap=3"]),
                                          ("sltrain", [])])
def test_torchrun_fsdp2_matches_one_process(method, extra, cache_dir, tmp_path):
    """FSDP2 over 2 gloo processes (left-projected matrices split on dim 1) trains like one process."""
    common = [f"method={method}", *TINY, "train.steps=6", "train.precision=fp64", *extra]
    _launch([*common, "train.batch_size=4", f"output_root={tmp_path / 'one'}"], _env(cache_dir))
    _launch([*common, *FSDP, "train.batch_size=2", f"output_root={tmp_path / 'two'}"], _env(cache_dir), nproc=2)
    run = {"galore": RUN, "frugal": "llama_tiny-frugal-dense", "sltrain": "llama_tiny-adamw-sltrain"}[method]
    _compare_runs(tmp_path / "one" / "runs" / run, tmp_path / "two" / "runs" / run, steps=6)


@pytest.mark.slow
def test_fsdp2_resume_and_resharding(cache_dir, tmp_path):
    """Exact resume under FSDP2 from its DCP checkpoint, and the same checkpoint continued by one
    process (2 -> 1) and a one-process checkpoint continued by two (1 -> 2)."""
    common = ["optimizer=fira", *TINY, "train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=3",
              "model.recipe.update_proj_gap=2", "train.precision=fp64", CANONICAL]
    two = [*common, *FSDP, "train.batch_size=2"]
    one = [*common, "train.batch_size=4"]
    fira = "llama_tiny-fira-dense"
    _launch([*two, f"output_root={tmp_path / 'a'}"], _env(cache_dir), nproc=2)
    whole = _metrics(tmp_path / "a" / "runs" / fira)

    def interrupted_copy(name: str) -> Path:
        """The run stopped after its step-3 checkpoint: later checkpoints, run.json and metrics dropped."""
        import shutil

        target = tmp_path / name / "runs" / fira
        shutil.copytree(tmp_path / "a" / "runs" / fira, target)
        shutil.rmtree(target / "checkpoints" / "step-00000006")
        (target / "run.json").unlink()
        return target

    resumed = interrupted_copy("b")
    _launch([*two, f"output_root={tmp_path / 'b'}"], _env(cache_dir), nproc=2)
    keys = ("train/loss", "train/grad_norm", "lr", "val/loss")
    assert [[m.get(k) for k in keys] for m in _metrics(resumed)] == [[m.get(k) for k in keys] for m in whole]

    on_one = interrupted_copy("c")  # 2 -> 1
    _launch([*one, f"output_root={tmp_path / 'c'}"], _env(cache_dir))
    _compare_runs(tmp_path / "a" / "runs" / fira, on_one, steps=6)

    _launch([*one, f"output_root={tmp_path / 'd'}"], _env(cache_dir))  # 1 -> 2
    import shutil

    target = tmp_path / "e" / "runs" / fira
    shutil.copytree(tmp_path / "d" / "runs" / fira, target)
    shutil.rmtree(target / "checkpoints" / "step-00000006")
    (target / "run.json").unlink()
    _launch([*two, f"output_root={tmp_path / 'e'}"], _env(cache_dir), nproc=2)
    _compare_runs(tmp_path / "d" / "runs" / fira, target, steps=6)


@pytest.mark.slow
def test_sst_under_fsdp2_fails_clearly(cache_dir, tmp_path):
    with pytest.raises(AssertionError, match="param=sst does not run under FSDP2"):
        _launch(["method=sst", *TINY, *FSDP, f"output_root={tmp_path}"], _env(cache_dir), nproc=2)


def test_layerwise_updates_through_the_harness(cache_dir, tmp_path):
    """train.layerwise=true, with accumulation: the losses of ordinary training (float64)."""
    common = ["optimizer=galore", *TINY, "train.steps=6", "train.grad_accum=2", "train.precision=fp64",
              "model.recipe.update_proj_gap=3"]
    run(config(*common), tmp_path / "a")
    run(config(*common, "train.layerwise=true"), tmp_path / "b")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["train/loss"] for m in b] == pytest.approx([m["train/loss"] for m in a], rel=1e-12)
    # The norm of the gradients as applied: at steps 1 and 4 (refreshes) whole; at the others the
    # attention/MLP matrices accumulated in their subspace, so their projected gradient counts (smaller).
    for step, (x, y) in enumerate(zip(a, b), start=1):
        if step in (1, 4):
            assert y["train/grad_norm"] == pytest.approx(x["train/grad_norm"], rel=1e-12)
        else:
            assert y["train/grad_norm"] < x["train/grad_norm"]


@pytest.mark.slow
def test_layerwise_updates_under_ddp(cache_dir, tmp_path):
    """DDP steps each parameter after its bucket's all-reduce: the numbers of one ordinary process."""
    common = ["optimizer=galore", *TINY, "train.steps=6", "train.grad_accum=2", "model.recipe.update_proj_gap=3",
              "train.precision=fp64", CANONICAL]
    _launch([*common, "train.batch_size=4", f"output_root={tmp_path / 'one'}"], _env(cache_dir))
    _launch([*common, "train.layerwise=true", "train.batch_size=2", f"output_root={tmp_path / 'two'}"],
            _env(cache_dir), nproc=2)
    _compare_runs(tmp_path / "one" / "runs" / RUN, tmp_path / "two" / "runs" / RUN, steps=6)
