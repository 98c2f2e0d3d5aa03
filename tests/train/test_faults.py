"""Runs never lose work: what the harness does when a run is killed, its files are damaged, two
processes start in one folder, the data changes under it, the disk fills up or the loss diverges."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lrtrain.files import FolderInUse, FolderLock, WriteError, atomic_write_text
from lrtrain.train.checkpoint import MANIFEST_FILE, checkpoints, verify_checkpoint
from lrtrain.train.logger import RunLogger
from lrtrain.train.loop import NonFiniteLoss
from lrtrain.train.run import build_trainer, run
from tests.train.test_harness import ROOT, TINY, _metrics, config

RESUMED = ("train/loss", "train/grad_norm", "lr", "val/loss")
CUT = [*TINY, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=3", "optimizer=galore",
       "model.recipe.update_proj_gap=3"]


def _trace(run_dir: Path) -> list[list]:
    return [[m.get(k) for k in RESUMED] for m in _metrics(run_dir)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cache_dir):
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("whole")
    run(config(*CUT), run_dir)
    return run_dir


def _interrupted(tmp_path: Path, until: int) -> Path:
    """A run killed after step ``until`` (it wrote no run.json, its lock died with it)."""
    trainer = build_trainer(config(*CUT), tmp_path)
    trainer.fit(until_step=until)
    trainer.close()
    return tmp_path


def _resume_and_compare(run_dir: Path, whole: Path, expect_start: int) -> None:
    trainer = build_trainer(config(*CUT), run_dir)
    assert trainer.step == expect_start
    trainer.close()
    run(config(*CUT), run_dir)
    assert _trace(run_dir) == _trace(whole)
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 9))


def _damage_truncate(path: Path) -> None:
    weights = path / "__0_0.distcp"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _damage_random_bytes(path: Path) -> None:
    """Random bytes over part of the weights, the size unchanged (what a bad disk or a stray write does)."""
    weights = path / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[1000:5000] = os.urandom(4000)
    weights.write_bytes(bytes(data))


def _damage_trainer_state(path: Path) -> None:
    (path / "trainer.pt").write_bytes(b"\x00" * 64)


def _damage_no_manifest(path: Path) -> None:
    (path / MANIFEST_FILE).unlink()


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_random_bytes, _damage_trainer_state, _damage_no_manifest],
                         ids=["truncated", "random-bytes", "trainer-state", "no-manifest"])
def test_damaged_latest_checkpoint_is_skipped(damage, whole, cache_dir, tmp_path):
    run_dir = _interrupted(tmp_path, until=5)  # checkpoints at 2 and 4
    latest = checkpoints(run_dir / "checkpoints")[-1]
    assert latest.name == "step-00000004" and verify_checkpoint(latest) is None
    damage(latest)
    assert verify_checkpoint(latest) is not None
    with pytest.warns(UserWarning, match=r"step-00000004 cannot be used: .*Moved it to .*damaged-step-00000004"):
        _resume_and_compare(run_dir, whole, expect_start=2)
    assert any(p.name.startswith("damaged-step-00000004") for p in (run_dir / "checkpoints").iterdir())


def test_all_checkpoints_damaged_starts_over(whole, cache_dir, tmp_path):
    run_dir = _interrupted(tmp_path, until=3)
    for path in checkpoints(run_dir / "checkpoints"):
        _damage_random_bytes(path)
    with pytest.warns(UserWarning, match="cannot be used"):
        _resume_and_compare(run_dir, whole, expect_start=0)


def test_torn_last_log_line_is_repaired(whole, cache_dir, tmp_path):
    run_dir = _interrupted(tmp_path, until=5)
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 6, "train/lo')  # killed in the middle of a line
    with pytest.warns(UserWarning, match="last line was cut off"):
        _resume_and_compare(run_dir, whole, expect_start=4)


def test_a_damaged_log_line_elsewhere_is_named(cache_dir, tmp_path):
    run_dir = _interrupted(tmp_path, until=3)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a metrics record"):
        build_trainer(config(*CUT), run_dir)


def test_kill_during_a_rewrite_keeps_the_old_file(tmp_path):
    """kill -9 while a file is being replaced (the log's rewind, run.json): the old file stays whole."""
    target = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": i, "train/loss": 1.0}) + "\n" for i in range(1, 200))
    target.write_text(original)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lrtrain.files import atomic_write
        def slow(path):
            with open(path, "w") as handle:
                handle.write("half of the new file")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
        atomic_write(Path({str(target)!r}), slow)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_text() == original  # never 0 bytes, never half
    # the rewind of a resumed run goes through the same atomic replacement
    RunLogger(tmp_path, "r", {}).rewind(100)
    assert [json.loads(line)["step"] for line in target.read_text().splitlines()] == list(range(1, 101))


def test_second_process_in_one_folder_is_refused(cache_dir, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from lrtrain.files import FolderLock
            lock = FolderLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=rf"{tmp_path} is in use by process {holder.pid} on .*another run_name"):
            build_trainer(config(*CUT), tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()  # a lock whose holder died is stale: the next run takes it over
        holder.wait()
    lock = FolderLock(tmp_path).acquire()
    assert lock.previous_holder["pid"] == holder.pid
    lock.release()
    assert FolderLock(tmp_path).acquire().previous_holder is None  # released cleanly: nothing stale


def test_the_same_process_cannot_train_twice_in_one_folder(cache_dir, tmp_path):
    first = build_trainer(config(*CUT), tmp_path)
    with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()}"):
        build_trainer(config(*CUT), tmp_path)
    first.close()
    build_trainer(config(*CUT), tmp_path).close()


def test_changed_data_is_detected_on_resume(cache_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    files = ["data=files", f"data.files.train=[{corpus}]"]
    run_dir = tmp_path / "run"
    trainer = build_trainer(config(*CUT, *files), run_dir)
    trainer.fit(until_step=3)
    trainer.close()
    corpus.write_text("Now is the winter of our discontent.\n" * 200)
    with pytest.raises(ValueError, match="trained on other data"):
        build_trainer(config(*CUT, *files), run_dir)
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)  # the same text again: resumes
    trainer = build_trainer(config(*CUT, *files), run_dir)
    assert trainer.step == 2
    trainer.close()


def test_resume_never_moves_the_old_run_aside(whole, cache_dir, tmp_path, capsys):
    run_dir = _interrupted(tmp_path, until=5)
    old_log = (run_dir / "metrics.jsonl").read_text()
    run(config(*CUT, "train.resume=never"), run_dir)
    moved = list((run_dir / ".replaced").iterdir())
    assert len(moved) == 1 and f"moved the previous run in {run_dir} to {moved[0]}" in capsys.readouterr().out
    assert (moved[0] / "metrics.jsonl").read_text() == old_log
    assert [p.name for p in checkpoints(moved[0] / "checkpoints")] == ["step-00000002", "step-00000004"]
    # the new run is whole and alone in its folder, and resumable like any other
    assert _trace(run_dir) == _trace(whole)
    assert [p.name for p in checkpoints(run_dir / "checkpoints")] == ["step-00000004", "step-00000006", "step-00000008"]


def test_kill_between_last_checkpoint_and_summary(whole, cache_dir, tmp_path, monkeypatch):
    def killed(self, summary):
        raise KeyboardInterrupt("killed after the last checkpoint, before run.json")

    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            run(config(*CUT), tmp_path)
    assert RunLogger.finished_summary(tmp_path) is None and checkpoints(tmp_path / "checkpoints")[-1].name.endswith("8")
    summary = run(config(*CUT), tmp_path)  # nothing left to train: the summary comes from the log
    expected = RunLogger.finished_summary(whole)
    for key in ("step", "train/loss", "val/loss", "val/ppl", "lr", "memory/optimizer_state_gib"):
        assert summary[key] == expected[key], key
    assert RunLogger.finished_summary(tmp_path) == summary


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_loss(mode, cache_dir, tmp_path, monkeypatch):
    import lrtrain.train.loop as loop

    real_loss, calls = loop.causal_lm_loss, []

    def poisoned(model, tokens):  # the 4th micro-batch (step 4 of 8) diverges
        calls.append(1)
        loss = real_loss(model, tokens)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(loop, "causal_lm_loss", poisoned)
    overrides = [*CUT, "train.eval_every=0", f"train.on_nonfinite={mode}"]
    if mode == "raise":
        with pytest.raises(NonFiniteLoss, match=r"step 4: the loss is nan; .*nothing was checkpointed after step 3"):
            run(config(*overrides), tmp_path)
        assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]
        assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]
        return
    summary = run(config(*overrides), tmp_path)
    records = _metrics(tmp_path)
    assert [m["step"] for m in records] == list(range(1, 9))
    assert records[3]["train/skipped_steps"] == 1 and records[3]["train/loss"] != records[3]["train/loss"]  # NaN
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in records if m["step"] != 4)
    assert summary["train/skipped_steps"] == 1 and torch.isfinite(torch.tensor(summary["val/loss"]))


def test_full_disk_names_the_path(cache_dir, tmp_path, monkeypatch):
    """A checkpoint write that runs out of space: a message with the path and "no space left", and the
    previous checkpoint still complete. A real full tmpfs where mounting one is allowed (root), else a
    mocked ENOSPC from the checkpoint writer."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    try:
        trainer = build_trainer(config(*CUT), disk / "run")
        trainer.fit(until_step=2)  # a complete checkpoint at step 2
        if mounted:
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as filler:
                filler.write(b"\0" * (free - 8192))
        else:
            import errno

            import torch.distributed.checkpoint as dcp

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(dcp, "save", no_space)
        try:
            with pytest.raises(WriteError, match=r"could not write .*step-00000004.*no space left on the device"):
                trainer.fit(until_step=4)
        finally:
            trainer.close()
        assert not list((disk / "run" / "checkpoints").glob(".step-*"))  # the failed write is cleaned up
        assert [p.name for p in checkpoints(disk / "run" / "checkpoints")] == ["step-00000002"]
        assert verify_checkpoint(checkpoints(disk / "run" / "checkpoints")[0]) is None
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_atomic_write_reports_a_full_disk(tmp_path, monkeypatch):
    import errno

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*run.json: no space left"):
        from lrtrain.files import atomic_write

        atomic_write(tmp_path / "run.json", full)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
    atomic_write_text(tmp_path / "run.json", "{}")
    assert (tmp_path / "run.json").read_text() == "{}"
