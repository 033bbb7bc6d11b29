"""Two processes through `accelerate launch`, for real, on the CPU: DDP keeps their adapters identical."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import tiny_config, write_manifest

from msdiffusion.tiny import save_tiny_models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_step(tmp_path):
    models = save_tiny_models(tmp_path / "models")
    manifest = write_manifest(tmp_path / "data", 8)
    config = tiny_config(models, manifest, tmp_path / "run", max_train_steps=2, checkpointing_steps=1, learning_rate=1e-3)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))

    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # On a machine without GPUs: `--multi_gpu` starts the processes (accelerate's `--cpu` starts only one) and
    # ACCELERATE_USE_CPU=1 makes them join over gloo on the CPU (docs/training.md says the same).
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "msdiffusion.train", "--config", str(config_file),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
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
