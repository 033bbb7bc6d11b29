"""Two processes through `accelerate launch`, for real, on the CPU: DDP keeps their adapters identical, and a
run killed while one process is saving resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import tiny_config, write_manifest

from msdiffusion.tiny import save_tiny_models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_file, *flags: str) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # On a machine without GPUs: `--multi_gpu` starts the processes (accelerate's `--cpu` starts only one) and
    # ACCELERATE_USE_CPU=1 makes them join over gloo on the CPU (docs/training.md says the same).
    return [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "msdiffusion",
        "train",
        "--config",
        str(config_file),
        *flags,
    ]


def _env(**extra: str) -> dict[str, str]:
    from fault_injection.sitecustomize import PAUSE_ENV, PAUSE_FILE_ENV

    env = {k: v for k, v in os.environ.items() if k not in (PAUSE_ENV, PAUSE_FILE_ENV)}
    # the test-only pauses, in every process accelerate starts (`fault_injection/sitecustomize.py`)
    faults = str(Path(__file__).resolve().parent / "fault_injection")
    path = os.pathsep.join([faults, env.get("PYTHONPATH", "")])
    return {
        **env,
        "PYTHONPATH": path,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _kill_processes_running(config_file: Path) -> None:
    """SIGKILL every process whose command line names `config_file`, and wait until they are gone."""
    if not Path("/proc").is_dir():  # no process table to read (not Linux): nothing this test can do
        return
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(config_file).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                pids.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


@pytest.mark.slow
def test_two_processes_train_in_step_and_resume_a_run_killed_while_saving(tmp_path):
    from fault_injection.sitecustomize import PAUSE_ENV, PAUSE_FILE_ENV

    from msdiffusion.train.checkpoints import find_checkpoints

    models = save_tiny_models(tmp_path / "models")
    manifest = write_manifest(tmp_path / "data", 8)
    settings = dict(max_train_steps=2, checkpointing_steps=1, learning_rate=1e-3, drop_image=0.3, drop_grounding=0.3)
    config = tiny_config(models, manifest, tmp_path / "run", **settings)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))

    result = subprocess.run(_launch(config_file), env=_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2, result.stderr[-6000:]
    first, second = summary["replica_fingerprints"]
    assert first == second and summary["replicas_in_sync"]
    # 8 samples in batches of 2 over 2 processes: 2 batches each per epoch, different ones per process.
    assert "2 batches per epoch on each process" in result.stderr and "mixed precision: no" in result.stderr
    # Each process wrote its own random generator state; both continue from the same weights.
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "generator_0.pt").is_file() and (checkpoint / "generator_1.pt").is_file()
    assert not torch.equal(torch.load(checkpoint / "generator_0.pt"), torch.load(checkpoint / "generator_1.pt"))
    trained = load_file(tmp_path / "run" / "adapter" / "ms_adapter.safetensors")
    initial = load_file(checkpoint.parent / "checkpoint-1" / "adapter" / "ms_adapter.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    # The same run killed (SIGKILL, launcher and workers) while process 1 has written its part of
    # checkpoint-2 and process 0 waits for it: checkpoint-2 stays incomplete, `latest` resumes from
    # checkpoint-1, and both processes end with the uninterrupted run's weights.
    killed_config = tiny_config(models, manifest, tmp_path / "killed", **settings)
    killed_file = tmp_path / "killed.yaml"
    killed_file.write_text(yaml.safe_dump(killed_config.to_dict()))
    flag = tmp_path / "paused"
    with open(tmp_path / "killed.log", "w") as log:
        launched = subprocess.Popen(
            _launch(killed_file),
            env=_env(**{PAUSE_ENV: "written@2:1", PAUSE_FILE_ENV: str(flag)}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 1200
    while not flag.exists() and launched.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # The launcher's session, then the workers: torch's elastic agent starts each worker in a session
    # of its own, so killing the launcher's alone would leave them running (waiting forever).
    os.killpg(launched.pid, signal.SIGKILL)
    launched.wait(timeout=600)
    _kill_processes_running(killed_file)
    assert flag.exists(), (tmp_path / "killed.log").read_text()[-5000:]
    complete, incomplete = find_checkpoints(tmp_path / "killed")
    assert [p.name for p in complete] == ["checkpoint-1"]
    assert [p.name for p, _ in incomplete] == ["checkpoint-2.partial"]

    resumed = subprocess.run(
        _launch(killed_file, "--resume-from-checkpoint", "latest"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "skipping " + str(tmp_path / "killed" / "checkpoint-2.partial") in resumed.stderr
    assert "resumed from " + str(tmp_path / "killed" / "checkpoint-1") + " at step 1" in resumed.stderr
    again = json.loads((tmp_path / "killed" / "train_summary.json").read_text())
    assert again["replica_fingerprints"] == summary["replica_fingerprints"]
    resumed_weights = load_file(tmp_path / "killed" / "adapter" / "ms_adapter.safetensors")
    assert all(torch.equal(trained[k], resumed_weights[k]) for k in trained)
