"""`msdiff data cache` and training from cached features."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import reset_accelerate, tiny_config, write_manifest

from msdiffusion.app.cli import main
from msdiffusion.tiny import save_tiny_models


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    models = save_tiny_models(folder / "models")
    manifest = write_manifest(folder / "data", 6)
    args = [
        "data",
        "cache",
        str(manifest),
        "--out",
        str(folder / "cache"),
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
        "4",
        "--shard-size",
        "4",
    ]
    assert main(args) == 0
    return {"models": models, "manifest": manifest, "cache": folder / "cache", "args": args}


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_cache_folder_layout_and_rerun_keeps_unchanged_shards(cached, capsys):
    info = json.loads((cached["cache"] / "cache.json").read_text())
    assert info["num_samples"] == 6 and info["reference_size"] == 64 and info["dtype"] == "float32"
    assert sorted(p.name for p in cached["cache"].glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert main(cached["args"]) == 0
    assert "0 samples encoded, 6 kept" in capsys.readouterr().out
    # other settings: nothing is kept, and the settings file says what the shards hold
    assert main(cached["args"] + ["--no-mask-references"]) == 0
    assert "6 samples encoded, 0 kept" in capsys.readouterr().out
    assert json.loads((cached["cache"] / "cache.json").read_text())["mask_references"] is False
    assert main(cached["args"]) == 0
    assert "6 samples encoded, 0 kept" in capsys.readouterr().out


def test_cached_features_equal_the_encoders_features(cached, tmp_path):
    from msdiffusion.train.conditioning import condition, draw_drops
    from msdiffusion.train.loop import TrainingRun

    settings = dict(drop_image=0.3, drop_text=0.3, drop_grounding=0.3)
    live = TrainingRun(tiny_config(cached["models"], cached["manifest"], tmp_path / "live", **settings))
    reset_accelerate()
    from_cache = TrainingRun(
        tiny_config(cached["models"], cached["manifest"], tmp_path / "cached", cache=str(cached["cache"]), **settings)
    )
    for live_batch, cached_batch in zip(live.dataloader, from_cache.dataloader):
        assert torch.equal(live_batch["index"], cached_batch["index"])
        assert torch.equal(live_batch["subject_boxes"], cached_batch["subject_boxes"])
        assert torch.equal(live_batch["pixel_values"], cached_batch["pixel_values"])
        drops = draw_drops(live.config, 2, torch.Generator().manual_seed(int(live_batch["index"][0])))
        a = condition(live_batch, drops, live.features, "cpu", torch.float32)
        b = condition(cached_batch, drops, from_cache.features, "cpu", torch.float32)
        for name in ("prompt_embeds", "pooled_prompt_embeds", "image_features", "phrase_embeds"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


def test_training_from_the_cache_loads_no_encoder_until_validation(cached, tmp_path, monkeypatch):
    import msdiffusion.train.models as models
    from msdiffusion.train.loop import TrainingRun

    def forbidden(*args, **kwargs):
        raise AssertionError("an encoder was loaded although the features are cached")

    monkeypatch.setattr(models, "load_text_encoders", forbidden)
    monkeypatch.setattr(models, "load_image_encoder", forbidden)
    config = tiny_config(
        cached["models"],
        cached["manifest"],
        tmp_path,
        cache=str(cached["cache"]),
        validation_steps=2,
        validation_settings={"steps": 1},
        validation_samples=1,
    )
    run = TrainingRun(config)
    monkeypatch.undo()  # validation images need the encoders: loaded then, on first use
    summary = run.train()
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert (tmp_path / "validation" / "step-000002" / "0-layout.png").is_file()
    assert (tmp_path / "ms_adapter.bin").is_file()


def test_a_stale_or_mismatched_cache_is_refused(cached, tmp_path):
    from msdiffusion.train.cache import CacheError
    from msdiffusion.train.loop import TrainingRun

    with pytest.raises(CacheError, match="mask_references: the cache has True, the training config False"):
        TrainingRun(
            tiny_config(
                cached["models"], cached["manifest"], tmp_path, cache=str(cached["cache"]), mask_references=False
            )
        )
    reset_accelerate()
    with pytest.raises(CacheError, match="reference_size: the cache has 64, the training config 128"):
        TrainingRun(
            tiny_config(cached["models"], cached["manifest"], tmp_path, cache=str(cached["cache"]), resolution=128)
        )

    edited = tmp_path / "manifest.jsonl"
    lines = cached["manifest"].read_text().splitlines()
    lines[3] = lines[3].replace("a brown bear", "a big brown bear")
    assert lines[3] != cached["manifest"].read_text().splitlines()[3]
    edited.write_text("\n".join(lines) + "\n")
    (tmp_path / "photos").symlink_to(cached["manifest"].parent / "photos")
    reset_accelerate()
    with pytest.raises(CacheError, match="stale from manifest line 4"):
        TrainingRun(tiny_config(cached["models"], edited, tmp_path / "run", cache=str(cached["cache"])))
    reset_accelerate()
    with pytest.raises(CacheError, match="not a feature cache"):
        TrainingRun(tiny_config(cached["models"], cached["manifest"], tmp_path / "run", cache=str(tmp_path)))


def test_cache_command_errors(cached, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nowhere.png", "caption": "a dog", "subjects": []}\n')
    args = list(cached["args"])
    args[2], args[4] = str(bad), str(tmp_path / "out")
    assert main(args) == 2
    assert "bad.jsonl:1: image: file not found" in capsys.readouterr().err
    args = list(cached["args"])
    args[6] = str(tmp_path / "no-base")
    assert main(args) == 2
    assert "--base: " in (err := capsys.readouterr().err) and "no-base' does not exist" in err
