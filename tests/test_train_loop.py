"""The training loop on tiny random models: learning, exact resume, export, checkpointing, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import reset_accelerate, tiny_config, write_manifest

from msdiffusion.tiny import save_tiny_models
from msdiffusion.train import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    return {"models": save_tiny_models(folder / "models"), "manifest": write_manifest(folder / "data", 6)}


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _run(setup, output_dir, **overrides):
    from msdiffusion.train.loop import TrainingRun

    return TrainingRun(tiny_config(setup["models"], setup["manifest"], output_dir, **overrides))


def _weights(folder):
    return load_file(folder / "adapter" / "ms_adapter.safetensors")


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(setup, tmp_path):
    run = _run(setup, tmp_path, learning_rate=1e-2, drop_image=0.0, drop_text=0.0, drop_both=0.0, drop_grounding=0.0)
    batch = next(iter(run.dataloader))
    assert batch["num_subjects"].sum() > 0
    losses = []
    for _ in range(8):
        run.generator.manual_seed(1)  # the same noise, timesteps and latent sample every step
        losses.append(run.training_step(batch).item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(setup, tmp_path):
    # 6 samples in batches of 2: 3 steps an epoch; resuming at step 2 skips 2 batches, then crosses
    # into epoch 1. Drops are frequent so that the restored random generator matters.
    settings = dict(
        max_train_steps=5,
        checkpointing_steps=2,
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
    whole = _run(setup, tmp_path / "whole", **settings).train()
    assert whole["steps"] == 5
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-5",
    ]

    reset_accelerate()
    resumed = _run(
        setup, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"), **settings
    ).train()
    assert resumed["steps"] == 5
    expected, got = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")  # EMA weights
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    raw_expected = load_file(tmp_path / "whole" / "checkpoint-5" / "trainable" / "ms_adapter.safetensors")
    raw_got = load_file(tmp_path / "resumed" / "checkpoint-5" / "trainable" / "ms_adapter.safetensors")
    assert all(torch.equal(raw_expected[k], raw_got[k]) for k in raw_expected)
    # and training did move the weights away from where the checkpoint was
    at_two = load_file(tmp_path / "whole" / "checkpoint-2" / "trainable" / "ms_adapter.safetensors")
    assert any(not torch.equal(at_two[k], raw_expected[k]) for k in at_two)


def test_resume_latest_and_a_missing_checkpoint(setup, tmp_path):
    first = _run(setup, tmp_path, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1).train()
    assert first["steps"] == 2
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]  # the limit removed checkpoint-1
    # A new run there would replace that run's checkpoints and adapter: refused before anything is written.
    reset_accelerate()
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"holds another run's training \(checkpoint-2, adapter/\)\. Continue it"):
        _run(setup, tmp_path, max_train_steps=3)
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    reset_accelerate()
    more = _run(setup, tmp_path, max_train_steps=3, resume_from_checkpoint="latest").train()
    assert more["steps"] == 3
    reset_accelerate()
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        _run(setup, tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")).train()


def test_latest_skips_incomplete_checkpoints_and_an_incomplete_one_is_refused(setup, tmp_path, caplog):
    import shutil

    from msdiffusion.train.checkpoints import IncompleteCheckpointError

    _run(setup, tmp_path, max_train_steps=3, checkpointing_steps=1).train()
    state = json.loads((tmp_path / "checkpoint-3" / "train_state.json").read_text())
    assert (
        state["step"] == 3 and "optimizer.bin" in state["files"] and "adapter/ms_adapter.safetensors" in state["files"]
    )
    (tmp_path / "checkpoint-3" / "optimizer.bin").unlink()  # lost since: no longer complete
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-4.partial")  # an interrupted save
    (tmp_path / "checkpoint-2" / "scheduler.bin").write_bytes(b"")  # truncated

    reset_accelerate()
    with caplog.at_level("INFO", logger="msdiffusion.train"):
        resumed = _run(setup, tmp_path, max_train_steps=3, resume_from_checkpoint="latest")
        assert resumed._resume() == 1
    assert f"skipping {tmp_path / 'checkpoint-3'}: optimizer.bin is missing" in caplog.text
    assert f"skipping {tmp_path / 'checkpoint-4.partial'}: its save was interrupted" in caplog.text
    assert f"skipping {tmp_path / 'checkpoint-2'}: scheduler.bin has 0 bytes" in caplog.text

    for damaged, why in (
        ("checkpoint-3", "optimizer.bin is missing"),
        ("checkpoint-4.partial", "save was interrupted"),
    ):
        reset_accelerate()
        with pytest.raises(
            IncompleteCheckpointError, match=f"is incomplete \\(.*{why}.*'latest', which takes the newest complete"
        ):
            _run(setup, tmp_path, resume_from_checkpoint=str(tmp_path / damaged)).train()


def test_exported_adapter_loads_in_the_inference_pipeline_and_generates(setup, tmp_path):
    from msdiffusion import MSDiffusionXLPipeline
    from msdiffusion.adapter import checkpoint_from_models, load_checkpoint

    run = _run(setup, tmp_path, learning_rate=1e-3)
    summary = run.train()
    trained = checkpoint_from_models(run.model.unet, run.model.projection)

    pipe = MSDiffusionXLPipeline.from_pretrained(str(setup["models"]["base"]))
    pipe.load_ms_adapter(summary["released_adapter"], image_encoder=str(setup["models"]["image_encoder"]))
    pipe.set_progress_bar_config(disable=True)
    for i, weights in trained.attention.items():  # the released-format file holds the trained weights
        processor = list(pipe.unet.attn_processors.values())[i]
        assert torch.equal(processor.to_k_ip.weight, weights["to_k_ip.weight"])
    reference = setup["manifest"].parent / "photos" / "000.png"
    image = pipe(
        prompt="a red dog and a blue cat",
        subject_images=[reference, reference],
        subject_phrases=["dog", "cat"],
        subject_boxes=[[0, 0, 0.5, 1], [0.5, 0, 1, 1]],
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0

    project = load_checkpoint(summary["adapter"])
    assert all(torch.equal(project.image_proj[k], v) for k, v in trained.image_proj.items())
    assert torch.equal(project.dummy_image_tokens, trained.dummy_image_tokens)


def test_only_the_adapter_trains_and_dummy_tokens_stay(setup, tmp_path):
    run = _run(setup, tmp_path, learning_rate=1e-2)
    unet_before = {k: v.clone() for k, v in run.model.unet.state_dict().items() if "_ip." not in k}
    dummy_before = run.model.projection.dummy_image_tokens.detach().clone()
    proj_before = run.model.projection.image_proj.proj_out.weight.detach().clone()
    processor = run.model.processors[0]
    assert torch.equal(
        processor.to_k_ip.weight,
        run.model.unet.get_submodule(
            [n for n in run.model.unet.attn_processors if n.endswith("attn2.processor")][0].removesuffix(".processor")
        ).to_k.weight,
    )  # to_k_ip starts as a copy of to_k
    run.train()
    after = run.model.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in unet_before.items())
    assert torch.equal(run.model.projection.dummy_image_tokens, dummy_before)
    assert not torch.equal(run.model.projection.image_proj.proj_out.weight, proj_before)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in run.params)


def test_activation_checkpointing_gives_the_same_gradients(setup, tmp_path):
    def gradients(checkpointing: bool):
        reset_accelerate()
        run = _run(setup, tmp_path, gradient_checkpointing=checkpointing, drop_grounding=0.0, drop_image=0.0)
        batch = next(iter(run.dataloader))
        run.generator.manual_seed(3)
        run.optimizer.step = lambda *a, **k: None  # keep the gradients for inspection
        run.optimizer.zero_grad = lambda *a, **k: None
        run.training_step(batch)
        return [p.grad.clone() for p in run.params]

    plain, recomputed = gradients(False), gradients(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mixed_precision_min_snr_v_prediction_high_noise_and_accumulation(setup, tmp_path):
    run = _run(
        setup,
        tmp_path,
        mixed_precision="bf16",
        snr_gamma=5.0,
        prediction_type="v_prediction",
        noise_offset=0.05,
        high_noise_share=0.5,
        gradient_accumulation_steps=2,
        max_train_steps=1,
    )
    assert run.model.unet.conv_in.weight.dtype == torch.bfloat16
    assert run.features.text_encoders.text_encoder.dtype == torch.bfloat16
    summary = run.train()
    assert summary["steps"] == 1 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in run.params)


def test_fp16_on_the_cpu_is_refused_with_the_alternative(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is refused on the CPU only")
    with pytest.raises(ConfigError, match="fp16 needs a GPU; on the CPU use bf16 or no"):
        _run(setup, tmp_path, mixed_precision="fp16")


def test_validation_images_logs_and_summary(setup, tmp_path):
    run = _run(
        setup,
        tmp_path,
        max_train_steps=3,
        validation_steps=2,
        validation_settings={"steps": 2},
        report_to="tensorboard",
        validation_samples=1,
    )
    summary = run.train()
    for step in ("step-000002", "step-000003"):  # every 2 steps, and at the end
        assert (tmp_path / "validation" / step / "0.png").is_file()
        assert (tmp_path / "validation" / step / "0-layout.png").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    written = json.loads((tmp_path / "train_summary.json").read_text())
    assert written["samples_per_s"] > 0 and written["peak_host_memory_gb"] > 0 and written["replicas_in_sync"]
    assert summary["steps"] == written["steps"] == 3
    assert (tmp_path / "config.yaml").is_file()


def test_eight_bit_adam_without_bitsandbytes_is_a_clear_error(setup, tmp_path, monkeypatch):
    import builtins

    from msdiffusion.train import ConfigError

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match="adamw_8bit needs bitsandbytes"):
        _run(setup, tmp_path, optimizer="adamw_8bit")


def test_train_command_reports_data_problems_clearly(setup, tmp_path, capsys):
    from msdiffusion.app.cli import main

    models = setup["models"]
    base_args = [
        "train",
        "--base",
        str(models["base"]),
        "--image-encoder",
        str(models["image_encoder"]),
        "--output-dir",
        str(tmp_path / "run"),
        "--report-to",
        "none",
        "--dataloader-workers",
        "0",
    ]
    bad = tmp_path / "bad.jsonl"
    lines = setup["manifest"].read_text().splitlines()
    bad.write_text(lines[0] + "\n" + lines[1].replace('"caption"', '"catpion"') + "\n")
    assert main(base_args + ["--manifest", str(bad)]) == 2
    assert "bad.jsonl:2: catpion: unknown key (did you mean 'caption'?)" in capsys.readouterr().err

    reset_accelerate()
    assert main(base_args + ["--manifest", str(setup["manifest"]), "--train-batch-size", "16"]) == 2
    assert "train_batch_size: the manifest's 6 samples make no full batch of 16" in capsys.readouterr().err


def test_validation_entries_from_the_config(setup, tmp_path):
    reference = str(setup["manifest"].parent / "photos" / "001.png")
    entries = [
        {
            "prompt": "a green toy on the table",
            "negative_prompt": "blurry",
            "subjects": [{"image": reference, "phrase": "toy", "box": [0.1, 0.2, 0.6, 0.9]}],
        }
    ]
    run = _run(
        setup, tmp_path, max_train_steps=1, validation_steps=1, validation_settings={"steps": 1}, validation=entries
    )
    assert [e.phrases for e in run.validator.entries] == [["toy"]]
    run.train()
    assert (tmp_path / "validation" / "step-000001" / "0-layout.png").is_file()
    assert not (tmp_path / "validation" / "step-000001" / "1.png").exists()


def _manifest_with_a_truncated_image(setup, tmp_path):
    """The setup's manifest, copied with its photos, with line 2's target image cut in half."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["manifest"].parent, data)
    line = json.loads((data / "manifest.jsonl").read_text().splitlines()[1])
    image = data / line["image"]
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    return data / "manifest.jsonl"


def test_unreadable_image_stops_before_the_first_step(setup, tmp_path, capsys):
    from msdiffusion.app.cli import main

    manifest = _manifest_with_a_truncated_image(setup, tmp_path)
    models = setup["models"]
    args = [
        "train",
        "--base",
        str(models["base"]),
        "--image-encoder",
        str(models["image_encoder"]),
        "--manifest",
        str(manifest),
        "--output-dir",
        str(tmp_path / "run"),
        "--report-to",
        "none",
        "--dataloader-workers",
        "0",
        "--resolution",
        "64",
        "--train-batch-size",
        "2",
        "--max-train-steps",
        "1",
        "--validation-steps",
        "0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "manifest.jsonl:2: image: cannot read" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before training started


def test_unreadable_image_is_skipped_and_counted(setup, tmp_path, caplog):
    manifest = _manifest_with_a_truncated_image(setup, tmp_path)
    run = _run_on(setup, manifest, tmp_path / "run", bad_samples="skip", max_train_steps=3, train_batch_size=2)
    with caplog.at_level("WARNING", logger="msdiffusion.train"):
        summary = run.train()
    assert summary["steps"] == 3 and summary["skipped_bad_samples"] >= 1
    assert (
        "skipped an unreadable sample (bad_samples: skip)" in caplog.text and "manifest.jsonl:2: image" in caplog.text
    )


def _run_on(setup, manifest, output_dir, **overrides):
    from msdiffusion.train.loop import TrainingRun

    return TrainingRun(tiny_config(setup["models"], manifest, output_dir, **overrides))


def test_a_finished_run_frees_its_models_before_the_interpreter_exits(setup, tmp_path):
    """DDP's reducer keeps the process group alive; freed during interpreter shutdown, gloo could abort a
    run that had succeeded (seen in CI as `terminate called without an active exception`)."""
    import weakref

    run = _run(setup, tmp_path, max_train_steps=1, checkpointing_steps=0)
    run.train()
    models = [weakref.ref(run.prepared_model), weakref.ref(run.model)]
    run.release()
    assert all(ref() is None for ref in models)


def test_timesteps_draw_the_high_noise_share_from_the_noisier_half_only_when_asked():
    from msdiffusion.train.timesteps import draw_timesteps

    uniform = draw_timesteps(4000, 1000, 0.0, torch.Generator().manual_seed(0))
    assert uniform.float().mean() == pytest.approx(500, abs=20)
    # without a share no extra numbers are drawn: the stream is the one runs before the option used
    assert torch.equal(uniform, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0)))
    skewed = draw_timesteps(4000, 1000, 0.5, torch.Generator().manual_seed(0))
    assert (skewed >= 500).float().mean() == pytest.approx(0.75, abs=0.03)
    assert skewed.min() >= 0 and skewed.max() < 1000


def test_the_step_log_line_is_the_one_benchmarks_gpu_training_reads(setup, tmp_path, caplog):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_training.py"
    spec = importlib.util.spec_from_file_location("gpu_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with caplog.at_level("INFO", logger="msdiffusion.train"):
        _run(setup, tmp_path, max_train_steps=2, log_every=1).train()
    found = [m for m in map(module.LOG_LINE.search, caplog.text.splitlines()) if m]
    assert [int(m["step"]) for m in found] == [1, 2]
    assert float(found[-1]["rate"]) > 0 and "peak_host_memory_gb" in found[-1]["memory"]
