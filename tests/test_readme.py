"""Every command in the README's bash blocks runs, shortened with overrides (a couple of steps of
a small model, outputs in a temporary folder), so the README cannot promise a command that fails.

The commands run in README order and share one output folder: ``compare.py`` reads the sweep the
command before it wrote. A command this module does not know how to shorten fails the test, so a
new README command needs a rule here."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Appended to every training command: two steps of 2 x 16 tokens, evaluated once at the end.
SHORT = ["train.steps=2", "train.warmup_steps=1", "train.seq_len=16", "train.batch_size=2", "train.eval_every=0",
         "train.eval_batches=1", "train.log_every=1", "train.progress=false", "train.grad_accum=1"]
#: Models too large to train in a test step on a CPU, and what stands in for them.
SMALLER = {"model=llama_1b": "model=llama_tiny", "model=llama_7b": "model=llama_tiny"}


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, cache_dir):
    return tmp_path_factory.mktemp("readme")


def _env(cache_dir) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "LRTRAIN_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def _shortened(words: list[str], outputs: Path, corpus: Path) -> list[str]:
    """The README command ``words`` as the test runs it. Sweeps write to ``outputs`` (where the
    ``compare.py`` commands after them look); a single run writes to a folder of its own below it,
    since several README commands train the same ``run_name`` with other settings."""
    words = [SMALLER.get(w, w) for w in words]
    if "-m" not in words and "scripts/pretrain.py" in words:
        outputs = outputs / re.sub(r"[^A-Za-z0-9._-]+", "_", " ".join(words[2:]))[:100]
    if words[0] == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        words = [w if not w.startswith("--nproc_per_node=") else "--nproc_per_node=2" for w in words[1:]]
        return [*launcher, *words, *SHORT, f"output_root={outputs}"]
    if words[:2] == ["python", "scripts/pretrain.py"]:
        if "--help" in words:
            return [sys.executable, *words[1:]]
        words = [re.sub(r"\[a\.txt,b\.txt\]", f"[{corpus},{corpus}]", w) for w in words]
        return [sys.executable, *words[1:], *SHORT, f"output_root={outputs}"]
    if words[:2] == ["python", "scripts/compare.py"]:
        return [sys.executable, "scripts/compare.py", str(outputs / Path(words[2]).relative_to("outputs")), *words[3:]]
    if words[:3] == ["python", "-m", "lrtrain.memory"]:
        return [sys.executable, *words[1:]]
    if words == ["bash", "scripts/run_main.sh"]:
        return [*words, *SHORT, f"output_root={outputs}"]
    raise AssertionError(f"README command {' '.join(words)!r} has no rule in tests/test_readme.py")


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _finished_runs(sweep: Path) -> list[str]:
    return sorted(p.parent.name for p in sweep.glob("*/run.json"))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, outputs, cache_dir):
    words = shlex.split(command)
    env = _env(cache_dir)
    if words == ["bash", "scripts/run_tests.sh"]:
        return  # the command that runs this test
    corpus = outputs / "a.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 300)
    if words == ["bash", "scripts/run_main.sh"] and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"run_main.sh sets up and uses {ROOT / '.venv'}; this interpreter is {sys.executable}")
    argv = _shortened(words, outputs, corpus)

    if "experiment=galore_60m" in words:  # C4 needs the network: offline it stops at once, saying so
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "C4 streams from the Hugging Face Hub and needs network access" in done.stderr
        return
    if words[:2] == ["python", "scripts/compare.py"] and "--wandb" in words:
        env = {**env, "WANDB_MODE": "offline"}
    done = _run(argv, env)

    if words == ["bash", "scripts/run_main.sh"]:
        report = (outputs / "sweeps" / "cpu_compare" / "report.md").read_text()
        assert report.count("\n| ") == 1 + 9  # a header and the nine methods
    elif "sweep_name=mine" in words:  # every job in a folder of its own, and the same command resumes nothing
        sweep = outputs / "sweeps" / "mine"
        assert _finished_runs(sweep) == [f"llama_tiny-{opt}-dense-optimizer.lr={lr}"
                                         for opt in ("fira", "galore") for lr in ("0.005", "0.01")]
        again = _run(argv, env)
        assert again.stdout.count("finished already") == 4
    elif words[:2] == ["python", "scripts/pretrain.py"] and "-m" in words and "sweep_name=" not in command:  # the default sweep name: the same folder again
        before = {p.name for p in (outputs / "sweeps").iterdir()}
        again = _run(argv, env)
        assert again.stdout.count("finished already") == 2 and {p.name for p in (outputs / "sweeps").iterdir()} == before
        (sweep,) = [p for p in (outputs / "sweeps").iterdir() if p.name.startswith("optimizer=galore,fira")]
        assert _finished_runs(sweep) == ["llama_tiny-fira-dense", "llama_tiny-galore-dense"]
    elif "sweep_name=storage" in words:  # one run per seed
        assert _finished_runs(outputs / "sweeps" / "storage") == [f"llama_tiny-galore-dense-seed={seed}" for seed in range(3)]
    elif words[:2] == ["python", "scripts/compare.py"]:
        # one row per job: runs of one method are told apart by their folder names
        assert all(f"| llama_tiny-{opt}-dense-optimizer.lr={lr} |" in done.stdout
                   for opt in ("fira", "galore") for lr in ("0.005", "0.01"))
        sweep = Path(argv[2])
        report = (sweep / "report.md").read_text()
        assert report.count("\n| ") == 1 + 4 and "| state at 7B (est.) |" in report  # a header and the 4 runs
        for image in ("loss_vs_step.png", "loss_vs_memory.png"):
            assert (sweep / image).stat().st_size > 10_000
        if "--wandb" in words:  # the table and plots as a wandb run (offline: under the sweep, nothing uploaded)
            offline = list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))
            assert len(offline) == 1 and offline[0].stat().st_size > 1000
    elif "--help" in words:
        assert "optimizer" in done.stdout and "model" in done.stdout
    elif words[:3] == ["python", "-m", "lrtrain.memory"]:
        assert "peak" in done.stdout
    elif "data=files" in words:
        (metrics,) = Path(argv[-1].partition("=")[2]).glob("runs/*/metrics.jsonl")
        assert "val/loss" in metrics.read_text()


def test_every_readme_command_has_a_rule(tmp_path):
    """The rule table covers the README (a cheap check that runs without the slow marker too)."""
    assert len(COMMANDS) >= 15
    for command in COMMANDS:
        words = shlex.split(command)
        if words != ["bash", "scripts/run_tests.sh"]:
            _shortened(words, tmp_path, tmp_path / "a.txt")
