"""Training runs killed for real (SIGKILL, SIGTERM) at chosen moments, then resumed with `latest`.

The moments are reached with the test-only pause of `tests/fault_injection/sitecustomize.py`
(MSDIFFUSION_TEST_PAUSE), which wraps the training code's own calls in the subprocess: the run
creates a flag file there and waits, the test kills it. Each resumed
run must end with the weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fault_injection.sitecustomize import PAUSE_ENV, PAUSE_FILE_ENV
from safetensors.torch import load_file
from train_fixtures import tiny_config, write_manifest

import msdiffusion
from msdiffusion.tiny import save_tiny_models
from msdiffusion.train.checkpoints import STATE_FILE, find_checkpoints, partial_checkpoints
from msdiffusion.train.loop import SIGTERM_REPEAT_WINDOW_S

ROOT = Path(msdiffusion.__file__).resolve().parents[1]
# 6 samples in batches of 2: 3 steps an epoch, so the 8 steps cross epochs; frequent drops make the
# restored random generators matter; a limit of 1 is the case where a save used to delete the only checkpoint.
SETTINGS = dict(
    max_train_steps=8,
    checkpointing_steps=2,
    checkpoints_total_limit=1,
    ema=True,
    ema_decay=0.5,
    noise_offset=0.1,
    learning_rate=1e-3,
    drop_image=0.3,
    drop_text=0.3,
    drop_both=0.1,
    drop_grounding=0.3,
    lr_scheduler="linear",
)


def _env(**extra: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in (PAUSE_ENV, PAUSE_FILE_ENV)}
    # this checkout's package, and the test-only pauses (`fault_injection/sitecustomize.py`)
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fault_injection"), os.environ.get("PYTHONPATH", "")])
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


class Run:
    """A `python -m msdiffusion train` subprocess, its output in files (a full pipe would block it)."""

    def __init__(
        self, command: list[str], folder: Path, name: str, pause: str | None = None, new_session: bool = False
    ):
        self.flag = folder / f"{name}.paused"
        self.stdout, self.stderr = folder / f"{name}.out", folder / f"{name}.err"
        env = _env(**({PAUSE_ENV: pause, PAUSE_FILE_ENV: str(self.flag)} if pause else {}))
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=err, cwd=ROOT, start_new_session=new_session
            )

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    # Generous limits: these runs take seconds, but minutes on a machine busy with other work.
    def wait_until(self, condition, what: str, timeout: float = 1200) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended (status {self.process.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def wait_for_pause(self) -> None:
        self.wait_until(self.flag.exists, "the pause")

    def kill(self, group: bool = False) -> None:
        if group:  # the launcher and its workers (their own session, started by this test)
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        self.process.wait(timeout=600)

    def finish(self, timeout: float = 1200) -> str:
        self.process.wait(timeout=timeout)
        output = self.output()
        assert self.process.returncode == 0, output[-5000:]
        return output


def _train(config_file: Path, folder: Path, name: str, pause: str | None = None, resume: bool = False, flags=()) -> Run:
    command = [sys.executable, "-m", "msdiffusion", "train", "--config", str(config_file), *flags]
    if resume:
        command += ["--resume-from-checkpoint", "latest"]
    return Run(command, folder, name, pause, new_session=True)


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "ms_adapter.safetensors")


def _assert_same_weights(expected: Path, got: Path) -> None:
    a, b = _weights(expected), _weights(got)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run's, e.g. {different[:3]}"
    released_a, released_b = torch.load(expected / "ms_adapter.bin"), torch.load(got / "ms_adapter.bin")
    assert all(torch.equal(v, released_b["image_proj"][k]) for k, v in released_a["image_proj"].items())


def _names(paths) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models, a manifest, and the uninterrupted run every interrupted one must end equal to."""
    folder = tmp_path_factory.mktemp("crash")
    models = save_tiny_models(folder / "models")
    manifest = write_manifest(folder / "data", 6)

    def config_file(output_dir: Path) -> Path:
        path = output_dir.parent / f"{output_dir.name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config(models, manifest, output_dir, **SETTINGS).to_dict()))
        return path

    whole = folder / "whole"
    _train(config_file(whole), folder, "whole").finish()
    return {"config_file": config_file, "whole": whole, "models": models, "manifest": manifest}


@pytest.mark.slow
def test_killed_at_each_moment_of_a_save_or_stopped_by_sigterm_resumes_to_the_uninterrupted_result(setup, tmp_path):
    run_dir = tmp_path / "run"
    config_file = setup["config_file"](run_dir)

    # 1. killed in the middle of writing checkpoint-4 (adapter exported, optimizer not yet): checkpoint-2
    # is still there although the limit is 1, and the half-written one is under its temporary name.
    run = _train(config_file, tmp_path, "1", pause="hook@4")
    run.wait_for_pause()
    run.kill()
    complete, incomplete = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-2"]
    assert _names(p for p, _ in incomplete) == ["checkpoint-4.partial"]
    assert not (run_dir / "checkpoint-4").exists()

    # 2. resumed from checkpoint-2, saying it skipped the interrupted save; killed after checkpoint-6 was
    # written and marked complete, before its rename
    run = _train(config_file, tmp_path, "2", pause="marked@6", resume=True)
    run.wait_for_pause()
    run.kill()
    output = run.output()
    assert "skipping " + str(run_dir / "checkpoint-4.partial") + ": its save was interrupted" in output
    assert f"resumed from {run_dir / 'checkpoint-2'} at step 2" in output
    assert (run_dir / "checkpoint-6.partial" / STATE_FILE).is_file()
    complete, _ = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-4"]  # 2 was removed only once 4 was complete

    # 3. resumed from checkpoint-4; killed after checkpoint-6 was renamed, before checkpoint-4 was removed
    run = _train(config_file, tmp_path, "3", pause="renamed@6", resume=True)
    run.wait_for_pause()
    run.kill()
    assert f"resumed from {run_dir / 'checkpoint-4'} at step 4" in run.output()
    complete, incomplete = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-4", "checkpoint-6"] and not incomplete

    # 4. resumed from checkpoint-6, with DataLoader workers; SIGTERM after step 7 (no checkpoint due) to every
    # process of the run, as Slurm sends it: it saves checkpoint-7 at the end of that step and exits cleanly,
    # saying how to resume; the run is not finished, so no export
    run = _train(config_file, tmp_path, "4", pause="step@7", resume=True, flags=("--dataloader-workers", "2"))
    run.wait_for_pause()
    assert f"resumed from {run_dir / 'checkpoint-6'} at step 6" in run.output()
    os.killpg(run.process.pid, signal.SIGTERM)  # its own session: the run and its workers
    run.wait_until(lambda: "SIGTERM received" in run.output(), "the SIGTERM message")
    run.flag.unlink()  # let it go on
    run.process.wait(timeout=1200)
    output = run.output()
    assert run.process.returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "Traceback" not in output
    assert f"stopped by SIGTERM at step 7 of 8: {run_dir / 'checkpoint-7'} holds everything to resume" in output
    assert "--resume-from-checkpoint latest" in output
    complete, incomplete = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-7"] and not incomplete  # 4 and 6 went (limit 1)
    assert not (run_dir / "adapter").exists() and not (run_dir / "train_summary.json").exists()

    # 5. resumed from checkpoint-7 to the end: the weights of the uninterrupted run, bit for bit
    output = _train(config_file, tmp_path, "5", resume=True).finish()
    assert f"resumed from {run_dir / 'checkpoint-7'} at step 7" in output
    _assert_same_weights(setup["whole"], run_dir)
    complete, incomplete = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-8"] and not incomplete  # the limit, and no leftover .partial
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once(setup, tmp_path):
    run_dir = tmp_path / "run"
    run = _train(setup["config_file"](run_dir), tmp_path, "term", pause="step@3")
    run.wait_for_pause()
    run.process.send_signal(signal.SIGTERM)
    run.wait_until(lambda: "SIGTERM received" in run.output(), "the SIGTERM message")
    time.sleep(SIGTERM_REPEAT_WINDOW_S + 0.5)  # sooner, it counts as the same one delivered twice
    run.process.send_signal(signal.SIGTERM)  # while the first is still waiting for the end of the step
    run.process.wait(timeout=600)
    assert run.process.returncode == -signal.SIGTERM
    assert "second SIGTERM: stopping at once" in run.output()
    complete, _ = find_checkpoints(run_dir)
    assert _names(complete) == ["checkpoint-2"] and not partial_checkpoints(run_dir)


@pytest.mark.slow
def test_a_feature_cache_killed_while_writing_a_shard_has_no_partial_shard_and_completes(setup, tmp_path):
    from msdiffusion.app.cli import main
    from msdiffusion.train.cache import FeatureCache

    models, manifest = setup["models"], setup["manifest"]

    def args(out: Path) -> list[str]:
        return [
            "data",
            "cache",
            str(manifest),
            "--out",
            str(out),
            "--base",
            str(models["base"]),
            "--image-encoder",
            str(models["image_encoder"]),
            "--reference-size",
            "64",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--workers",
            "0",
            "--batch-size",
            "2",
            "--shard-size",
            "2",
        ]

    # killed after shard 1 was written under its temporary name, before the rename
    run = Run([sys.executable, "-m", "msdiffusion", *args(tmp_path / "cache")], tmp_path, "cache", pause="shard@1")
    run.wait_for_pause()
    run.kill()
    shards = sorted(p.name for p in (tmp_path / "cache").glob("shard-*"))
    assert shards == ["shard-00000.safetensors"]  # shard 1 is absent, not half-written
    assert [p.name for p in (tmp_path / "cache").glob(".shard-00001.tmp-*.safetensors")]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): float sums depend on threads
    try:
        assert main(args(tmp_path / "cache")) == 0  # finishes it, keeping shard 0
        assert main(args(tmp_path / "whole")) == 0
    finally:
        torch.set_num_threads(threads)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # temporaries removed
    resumed, whole = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "whole")
    for index in range(6):
        a, b = resumed.read(index), whole.read(index)
        assert all(torch.equal(a[k], b[k]) if a[k] is not None else b[k] is None for k in a), index


def test_a_sigterm_repeated_at_once_is_one_request(monkeypatch):
    from msdiffusion.train import loop

    stopped = []
    with loop._StopRequest() as stop:
        for _ in range(2):  # as when a launcher forwards the SIGTERM its processes also got
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs in this (main) thread
        assert stop.signal_name == "SIGTERM"  # and this process is still alive
        monkeypatch.setattr(os, "kill", lambda pid, sig: stopped.append(sig))
        stop._received_at -= loop.SIGTERM_REPEAT_WINDOW_S  # a later one
        stop._handle(signal.SIGTERM, None)
    assert stopped == [signal.SIGTERM]  # re-raised with the default action: the process would end now
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # restored on exit
