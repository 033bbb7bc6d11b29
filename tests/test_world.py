"""The procedural world: scenes, their manifest, the held-out split and the evaluator's measures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from msdiffusion.boxes import box_iou
from msdiffusion.world.evaluate import (
    AskedSubject,
    connected_regions,
    descriptor,
    descriptor_distance,
    identity_is_correct,
)
from msdiffusion.world.scenes import (
    _PAIRS,
    CLASSES,
    COLOR_NAMES,
    NUM_IDENTITIES,
    PATTERNS,
    SIZE,
    SceneSubject,
    caption_for,
    draw_background,
    draw_subject,
    identity_parts,
    identity_words,
    is_held_out,
    look_alikes,
    mask_box,
    random_scene,
    render_reference,
    render_scene,
)


def test_world_has_classes_and_thousands_of_identities_with_a_held_out_tenth():
    assert len(CLASSES) >= 8
    assert NUM_IDENTITIES >= 2000
    held = [i for i in range(NUM_IDENTITIES) if is_held_out(i)]
    assert 0.09 < len(held) / NUM_IDENTITIES < 0.11
    assert len({identity_parts(i) for i in range(NUM_IDENTITIES)}) == NUM_IDENTITIES  # all distinct


def test_held_out_by_appearance_no_held_out_identity_renders_like_a_training_one():
    held = [i for i in range(NUM_IDENTITIES) if is_held_out(i)]
    assert all(is_held_out(twin) for i in held for twin in look_alikes(i))
    # stripes, checks and gradients: their look-alike groups held out whole (look-alikes render alike:
    # test_descriptor_tells_directions_apart_and_look_alikes_render_alike)
    assert sum(bool(look_alikes(i)) for i in held) > 100


def test_scene_caption_boxes_and_masks_agree():
    for i in range(20):
        scene = random_scene(np.random.default_rng([3, i]))
        assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.subjects) <= 4
        words = scene.caption.replace(",", "").split()
        for subject, mask in zip(scene.subjects, scene.masks):
            assert subject.cls in words
            assert not is_held_out(subject.identity)
            assert mask.sum() > 20
            assert subject.box == mask_box(mask)
            x0, y0, x1, y1 = subject.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # one caption word per subject, in order
        assert [w for w in words if w in CLASSES] == [s.cls for s in scene.subjects]


def test_subjects_are_drawn_at_their_scene_counts_sizes_and_most_scenes_keep_every_subject():
    from msdiffusion.world.scenes import SUBJECT_SIZES

    kept = 0
    for i in range(200):
        scene = random_scene(np.random.default_rng([4, i]))
        n = int(np.random.default_rng([4, i]).choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
        kept += len(scene.subjects) == n
        assert all(SUBJECT_SIZES[n][0] <= s.size <= SUBJECT_SIZES[n][1] for s in scene.subjects)
    assert kept >= 190  # a subject that finds no room is dropped; smaller retries make that rare


def test_saved_base_keeps_no_path_of_the_machine_that_trained_it(tmp_path):
    from diffusers import AutoencoderKL

    from msdiffusion.world import models
    from msdiffusion.world.base import _Base, save_base

    models.vae().save_pretrained(tmp_path / "trained-vae")  # the recipe loads its VAE from a folder
    vae = AutoencoderKL.from_pretrained(tmp_path / "trained-vae")
    tokenizer, _ = models.tokenizers(tmp_path / "tokenizer")
    base = _Base(models.unet((16, 16, 16)), *models.text_encoders(tokenizer))
    out = save_base(base, vae, tmp_path / "base", tmp_path / "tokenizer")
    configs = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.json")}
    assert "vae/config.json" in configs
    assert not [name for name, text in configs.items() if str(tmp_path) in text or "_name_or_path" in text]


def test_shipped_weights_keep_no_local_paths():
    from msdiffusion.loading import WORLD_WEIGHTS as WEIGHTS_DIR

    texts = {p.relative_to(WEIGHTS_DIR).as_posix(): p.read_text() for p in WEIGHTS_DIR.rglob("*.json")}
    assert len(texts) >= 8
    assert not [name for name, text in texts.items() if "_name_or_path" in text or "/work/" in text or "runs/" in text]


def test_shipped_weights_are_fp16_safetensors_within_25_mb():
    from safetensors import safe_open

    from msdiffusion.loading import WORLD_WEIGHTS as WEIGHTS_DIR

    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    if not files:
        pytest.skip("the world's weights are not in the package (msdiff world build)")
    assert sum(p.stat().st_size for p in files) <= 25_000_000  # the budget for the package
    for path in WEIGHTS_DIR.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path


def test_recipe_adapter_config_is_a_train_config(tmp_path):
    from msdiffusion.train.config import config_from_dict
    from msdiffusion.world.recipe import WorldRecipe, adapter_config

    config = adapter_config(tmp_path, WorldRecipe())
    assert "resampler" in config and "init_adapter" not in config  # a fresh adapter, from scratch
    assert config_from_dict(config).max_train_steps == 3000


@pytest.mark.slow
def test_image_encoder_learns_to_tell_held_out_subjects_apart_from_training_renderings():
    from msdiffusion.world import models
    from msdiffusion.world.image_encoder import (
        ImageEncoderRecipe,
        identity_retrieval,
        subject_pool,
        train_image_encoder,
    )

    recipe = ImageEncoderRecipe(steps=120, batch=48, pool_subjects=160, views=2, warmup_steps=5)
    assert all(not is_held_out(i) for _, i in subject_pool(200, held_out=False, seed=0))
    torch.manual_seed(recipe.seed)
    untrained = identity_retrieval(models.image_encoder().eval(), count=48)
    trained = identity_retrieval(train_image_encoder(recipe, log=lambda *_: None), count=48)
    # chance is 1 in 48 (measured: 4% untrained, 58% trained); held-out identities never enter training
    assert trained["embedding"] >= 0.35 and trained["embedding"] > untrained["embedding"] + 0.25
    with pytest.raises(ValueError, match="views, batch and pool_subjects must be at least 2"):
        train_image_encoder(ImageEncoderRecipe(views=1), log=lambda *_: None)


def test_recipe_image_encoder_stage_trains_it(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from msdiffusion.world import models
    from msdiffusion.world.image_encoder import ImageEncoderRecipe
    from msdiffusion.world.recipe import WorldRecipe, build

    tiny = ImageEncoderRecipe(steps=3, batch=8, pool_subjects=8, views=2, warmup_steps=1)
    build(tmp_path / "trained", WorldRecipe(image_encoder=tiny), stages=("image_encoder",), log=lambda *_: None)
    trained = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "trained" / "image_encoder")
    torch.manual_seed(tiny.seed)
    untrained = models.image_encoder()
    assert trained.dtype == torch.float16
    weight = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(trained.state_dict()[weight].float(), untrained.state_dict()[weight])
    assert (
        json.loads((tmp_path / "trained" / "recipe.json").read_text())["image_encoder"]["image_encoder"]["steps"] == 3
    )


def test_recipe_record_keeps_each_stage_recipe_when_later_calls_change_flags(tmp_path, capsys):
    """`recipe.json` says what made each output: a later call with other settings for other stages
    leaves a finished stage's entry alone (it used to rewrite one recipe for all)."""
    from msdiffusion.app.cli import main
    from msdiffusion.world.base import BaseRecipe
    from msdiffusion.world.image_encoder import ImageEncoderRecipe
    from msdiffusion.world.recipe import WorldRecipe, build

    out = tmp_path / "build"
    out.mkdir()
    (out / "recipe.json").write_text('{"num_scenes": 24000, "seed": 0}')  # an earlier version's record
    tiny = ImageEncoderRecipe(steps=2, batch=8, pool_subjects=8, views=2, warmup_steps=1)
    build(out, WorldRecipe(image_encoder=tiny), stages=("image_encoder",), log=lambda *_: None)
    later = WorldRecipe(num_scenes=3, base=BaseRecipe(subject_loss_weight=0.0), image_encoder=tiny)
    build(out, later, stages=("image_encoder", "data"), log=lambda *_: None)
    record = json.loads((out / "recipe.json").read_text())
    assert set(record) == {"earlier sittings", "image_encoder", "data"}
    assert record["earlier sittings"]["num_scenes"] == 24000
    assert (
        record["image_encoder"]["num_scenes"] == 24000 and record["image_encoder"]["base"]["subject_loss_weight"] == 3.0
    )
    assert record["data"]["num_scenes"] == 3 and record["data"]["base"]["subject_loss_weight"] == 0.0

    capsys.readouterr()
    assert main(["world", "build", "--out", str(out), "--stages", "image_encoder,data"]) == 0
    assert "stage times (this run): none, every stage was done already" in capsys.readouterr().out


def test_a_stage_begun_with_one_recipe_does_not_resume_with_another(tmp_path, capsys):
    """A base stopped mid-cycle and resumed without its --recipe (the defaults) would go on from its
    checkpoint on another schedule: refused, naming what changed; the same recipe goes on."""
    from dataclasses import asdict

    from msdiffusion.app.cli import main
    from msdiffusion.world.base import BaseRecipe
    from msdiffusion.world.recipe import WorldRecipe

    out = tmp_path / "build"
    out.mkdir()
    begun = WorldRecipe(base=BaseRecipe(cycles=((3000, 3e-4, 0.5),)))
    (out / "recipe.json").write_text(json.dumps({"base": asdict(begun)}))  # the base stage's first sitting
    assert main(["world", "build", "--out", str(out), "--stages", "base"]) == 2
    err = capsys.readouterr().err
    assert "its base stage was begun with another recipe (base.cycles: [[3000, 0.0003, 0.5]] -> [[5000" in err
    assert "the same --recipe file" in err
    assert json.loads((out / "recipe.json").read_text()) == {"base": json.loads(json.dumps(asdict(begun)))}
    # other fields than the stage reads may change (the adapter's, here); the stage then runs as begun
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("base: {cycles: [[3000, 3.0e-4, 0.5]]}\nadapter_steps: 10\n")
    with pytest.raises(OSError):  # past the check: the base stage then reads its VAE, absent here
        main(["world", "build", "--out", str(out), "--stages", "base", "--recipe", str(recipe_file)])
    assert "[base] ..." in capsys.readouterr().out


def test_a_record_written_before_a_field_existed_counts_it_as_its_default():
    """A build folder recorded by older code lacks the fields added since; each new field defaults to
    what the code did before, so the folder still resumes and is still reused."""
    from dataclasses import asdict, replace

    from msdiffusion.world.recipe import STAGE_FIELDS, WorldRecipe, changed_fields

    recipe = WorldRecipe()
    older = json.loads(json.dumps(asdict(recipe)))
    del older["adapter_lr"], older["image_encoder"]["temperature"]  # as if added after the record
    for stage in ("adapter", "image_encoder"):
        assert changed_fields(older, asdict(recipe), STAGE_FIELDS[stage]) == []
    moved = replace(recipe, adapter_lr=1e-4, image_encoder=replace(recipe.image_encoder, temperature=0.2))
    assert changed_fields(older, asdict(moved), STAGE_FIELDS["adapter"]) == ["adapter_lr: 0.0003 -> 0.0001"]
    assert changed_fields(older, asdict(moved), STAGE_FIELDS["image_encoder"]) == [
        "image_encoder.temperature: 0.1 -> 0.2"
    ]


def test_reuse_links_the_stages_finished_elsewhere_with_the_same_settings_and_inputs(tmp_path, monkeypatch, capsys):
    """A variant of one stage links every other stage from the finished build and trains that stage
    alone; a stage whose inputs are trained anew (here the adapter, after another image encoder) is
    trained too."""
    from dataclasses import asdict, replace

    from msdiffusion.app.cli import main
    from msdiffusion.world import recipe as recipe_module
    from msdiffusion.world.image_encoder import ImageEncoderRecipe
    from msdiffusion.world.recipe import STAGE_OUTPUTS, STAGES, WorldRecipe, build

    recipe = WorldRecipe(image_encoder=ImageEncoderRecipe(steps=2, batch=8, pool_subjects=8, views=2, warmup_steps=1))
    finished = tmp_path / "finished"  # a finished build, its outputs stood in for by their marker files
    for _, marker in STAGE_OUTPUTS.values():
        (finished / marker).parent.mkdir(parents=True, exist_ok=True)
        (finished / marker).mkdir() if marker.endswith("adapter") else (finished / marker).write_text("{}")
    (finished / "recipe.json").write_text(json.dumps({name: asdict(recipe) for name in STAGE_OUTPUTS}))
    trained = []
    monkeypatch.setattr(recipe_module.subprocess, "run", lambda command, **kw: trained.append(command))
    stages = STAGES[:-1]  # not the export

    logged = []
    build(tmp_path / "same", recipe, stages=stages, reuse=finished, log=logged.append)
    assert [line for line in logged if "linked" in line] == [
        f"[{name}] linked from {finished / path}" for name, (path, _) in STAGE_OUTPUTS.items()
    ]
    assert (tmp_path / "same" / "base").resolve() == finished / "base" and not trained

    build(tmp_path / "steps", replace(recipe, adapter_steps=6000), stages=stages, reuse=finished, log=print)
    assert (tmp_path / "steps" / "base").is_symlink() and not (tmp_path / "steps" / "adapter-train").is_symlink()
    assert len(trained) == 1  # the adapter alone, on the linked base
    assert "max_train_steps: 6000" in (tmp_path / "steps" / "adapter.yaml").read_text()

    encoder = replace(recipe.image_encoder, steps=3)
    build(tmp_path / "encoder", replace(recipe, image_encoder=encoder), stages=stages, reuse=finished, log=print)
    assert not (tmp_path / "encoder" / "image_encoder").is_symlink()  # trained here (3 steps)
    assert (tmp_path / "encoder" / "image_encoder" / "config.json").is_file()
    assert len(trained) == 2  # and the adapter on it

    assert main(["world", "build", "--out", str(tmp_path / "x"), "--reuse", str(tmp_path), "--stages", "data"]) == 2
    assert "is neither a world build folder nor an export of one (no recipe.json)" in capsys.readouterr().err


def test_reuse_of_an_export_lends_its_models_and_makes_the_data_again(tmp_path, monkeypatch):
    """An export (the shipped weights' layout) lends its VAE, base, image encoder and evaluator to a
    variant; the data, which it does not hold, is made here, and a model whose data would differ is
    trained anew."""
    from dataclasses import asdict, replace

    from msdiffusion.world import recipe as recipe_module
    from msdiffusion.world.data import MANIFEST
    from msdiffusion.world.recipe import EXPORTED_OUTPUTS, STAGES, WorldRecipe, build, is_export

    recipe = WorldRecipe()
    exported = tmp_path / "export"
    for _, marker in EXPORTED_OUTPUTS.values():
        (exported / marker).parent.mkdir(parents=True, exist_ok=True)
        (exported / marker).write_text("{}")
    (exported / "adapter").mkdir()
    (exported / "recipe.json").write_text(json.dumps({name: asdict(recipe) for name in STAGES[:-1]}))
    assert is_export(exported) and not is_export(tmp_path)
    made, trained = [], []

    def write_dataset(folder, num_scenes, seed):
        made.append((num_scenes, seed))
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text("")

    monkeypatch.setattr(recipe_module, "write_dataset", write_dataset)
    monkeypatch.setattr(recipe_module.subprocess, "run", lambda command, **kw: trained.append(command))
    monkeypatch.setattr(recipe_module, "train_base", lambda *a: pytest.fail("the base is lent by the export"))

    longer = replace(recipe, adapter_steps=6000)
    logged = []
    build(tmp_path / "longer", longer, stages=STAGES[:-1], reuse=exported, log=logged.append)
    assert [line for line in logged if "linked" in line] == [
        f"[{name}] linked from {exported / path}" for name, (path, _) in EXPORTED_OUTPUTS.items()
    ]
    assert (tmp_path / "longer" / "base-train" / "vae").resolve() == exported / "base" / "vae"
    assert made == [(recipe.num_scenes, recipe.seed)] and len(trained) == 1  # the data here, the adapter
    assert "max_train_steps: 6000" in (tmp_path / "longer" / "adapter.yaml").read_text()

    # Another seed makes other scenes: the VAE (which reads none) is lent, the base is not.
    base_runs = []
    monkeypatch.setattr(recipe_module, "train_base", lambda *a: base_runs.append(a))
    monkeypatch.setattr(recipe_module, "save_base", lambda *a: None)
    monkeypatch.setattr("diffusers.AutoencoderKL.from_pretrained", lambda *a, **k: None)
    build(tmp_path / "seed", replace(recipe, seed=1), stages=("data", "vae", "base"), reuse=exported, log=print)
    assert (tmp_path / "seed" / "base-train" / "vae").is_symlink() and not (tmp_path / "seed" / "base").exists()
    assert len(base_runs) == 1
    # A later sitting without the data stage: the data made here in the first counts.
    build(tmp_path / "later", recipe, stages=("data",), log=print)
    build(tmp_path / "later", recipe, stages=("vae", "base"), reuse=exported, log=print)
    assert (tmp_path / "later" / "base").is_symlink() and len(base_runs) == 1


def test_an_export_keeps_the_recipe_that_made_it_and_lends_its_models(tmp_path):
    import shutil
    from dataclasses import asdict

    from msdiffusion.tiny import save_tiny_models
    from msdiffusion.world.recipe import STAGES, WorldRecipe, _reusable, export

    tiny = save_tiny_models(tmp_path / "tiny")
    out = tmp_path / "build"
    shutil.copytree(tiny["base"], out / "base")
    shutil.copytree(tiny["image_encoder"], out / "image_encoder")
    shutil.copytree(tiny["adapter"], out / "adapter-train" / "adapter")
    (out / "evaluator.safetensors").write_bytes(b"")
    record = {name: asdict(WorldRecipe()) for name in STAGES[:-1]}
    (out / "recipe.json").write_text(json.dumps(record))
    exported = export(out, tmp_path / "export", log=lambda *_: None)
    assert json.loads((exported / "recipe.json").read_text()) == json.loads(json.dumps(record))
    lent = _reusable(exported, tmp_path / "variant", WorldRecipe(adapter_steps=10), STAGES, {})
    assert {name: path for name, (_, path) in lent.items()} == {
        "vae": exported / "base" / "vae",
        "base": exported / "base",
        "image_encoder": exported / "image_encoder",
        "evaluator": exported / "evaluator.safetensors",
    }


def test_the_shipped_weights_lend_their_models_to_a_variant_of_the_shipped_recipe(tmp_path):
    from dataclasses import replace

    from msdiffusion.loading import WORLD_WEIGHTS as WEIGHTS_DIR
    from msdiffusion.world.recipe import STAGES, _reusable, is_export, read_recipe

    if not (WEIGHTS_DIR / "recipe.json").is_file():
        pytest.skip("the world's weights are not in the package (msdiff world build)")
    shipped = read_recipe(Path(__file__).resolve().parents[1] / "recipes" / "world" / "shipped.yaml")
    variant = replace(shipped, adapter_steps=6000, adapter_lr=1e-4)
    assert is_export(WEIGHTS_DIR)
    assert list(_reusable(WEIGHTS_DIR, tmp_path, variant, STAGES, {})) == ["vae", "base", "image_encoder", "evaluator"]
    assert "base" not in _reusable(WEIGHTS_DIR, tmp_path, replace(shipped, num_scenes=100), STAGES, {})


def test_a_recipe_file_extends_another_and_says_only_what_it_changes(tmp_path):
    from pathlib import Path

    from msdiffusion.world.recipe import read_recipe

    shipped = Path(__file__).resolve().parents[1] / "recipes" / "world" / "shipped.yaml"
    variant = tmp_path / "attempts" / "adapter-6000.yaml"
    variant.parent.mkdir()
    variant.write_text(f"extends: {shipped}\nadapter_steps: 6000\nbase: {{subject_loss_weight: 1.0}}\n")
    recipe, original = read_recipe(variant), read_recipe(shipped)
    assert recipe.adapter_steps == 6000 and recipe.base.subject_loss_weight == 1.0
    assert recipe.base.cycles == original.base.cycles and recipe.base.class_sampling == original.base.class_sampling
    assert recipe.num_scenes == original.num_scenes and recipe.image_encoder == original.image_encoder
    (tmp_path / "attempts" / "relative.yaml").write_text("extends: adapter-6000.yaml\nadapter_lr: 1.0e-4\n")
    assert read_recipe(tmp_path / "attempts" / "relative.yaml").adapter_steps == 6000  # relative to the file
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="`extends` comes back to this file"):
        read_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        read_recipe(tmp_path / "c.yaml")


def test_world_build_command_runs_a_recipe_file_and_refuses_what_cannot_be_built(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from msdiffusion.app.cli import main
    from msdiffusion.world import recipe as recipe_module
    from msdiffusion.world.base import BaseRecipe
    from msdiffusion.world.recipe import WorldRecipe, read_recipe

    seen = []
    monkeypatch.setattr(recipe_module, "build", lambda out, recipe, **kw: seen.append((recipe, kw)) or {})
    assert main(["world", "build", "--out", str(tmp_path), "--stages", "image_encoder"]) == 0
    assert seen[0][0] == WorldRecipe() and seen[0][1]["stages"] == ("image_encoder",)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "base:\n  unet_channels: [32, 64, 128]\n  subject_loss_weight: 0\n  cycles: [[3000, 3.0e-4, 0.5]]\n"
        "  class_sampling: [[hourglass, 3]]\nadapter_steps: 1000\n"
    )
    assert main(["world", "build", "--out", str(tmp_path), "--recipe", str(recipe_file)]) == 0
    recipe = seen[1][0]
    assert recipe.base.unet_channels == (32, 64, 128) and recipe.base.cycles == ((3000, 3e-4, 0.5),)
    assert recipe.base.class_sampling == (("hourglass", 3),) and recipe.adapter_steps == 1000
    assert (
        recipe.base.subject_loss_weight == 0 and recipe.base.vae_steps == BaseRecipe().vae_steps
    )  # the rest: defaults
    for bad, words in (
        ("adapter_step: 3", "unknown field 'adapter_step' (did you mean 'adapter_steps'?)"),
        ("base: {unet_channel: [64, 96, 128]}", "did you mean 'unet_channels'?"),
        ("base: {unet_channels: [64, 96, 130]}", "base.unet_channels: three multiples of 16"),
        ("base: {cycles: [[3000, 3.0e-4]]}", "base.cycles[0]"),
        ("base: {class_sampling: [[hexagon, 2]]}", "base.class_sampling[0]"),
        ("adapter_steps: 0", "adapter_steps: a positive integer"),
        ("[1, 2]", "expected a mapping"),
    ):
        recipe_file.write_text(bad)
        assert main(["world", "build", "--out", str(tmp_path), "--recipe", str(recipe_file)]) == 2
        assert words in capsys.readouterr().err, bad
    assert main(["world", "build", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert len(seen) == 2
    # the recipes in the repository are valid recipe files
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes" / "world").glob("*.yaml")):
        assert read_recipe(path).base.cycles, path


def test_world_build_command_restarts_the_base_from_a_snapshot(tmp_path, monkeypatch, capsys):
    from msdiffusion.app.cli import main
    from msdiffusion.world import recipe as recipe_module

    seen = []
    monkeypatch.setattr(recipe_module, "build", lambda out, recipe, **kw: seen.append(recipe) or {})
    snapshot = tmp_path / "step-16000"
    assert main(["world", "build", "--out", str(tmp_path), "--init-base", str(snapshot)]) == 2  # not a snapshot
    snapshot.mkdir()
    (snapshot / "training_step.json").write_text('{"step": 16000}')  # the end of the recipe's last cycle
    assert main(["world", "build", "--out", str(tmp_path), "--init-base", str(snapshot)]) == 2
    assert "at least one more" in capsys.readouterr().err and not seen  # refused before any stage runs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "training_step.json").write_text("{")  # cut short
    assert main(["world", "build", "--out", str(tmp_path), "--init-base", str(broken)]) == 2
    assert "not a snapshot record" in capsys.readouterr().err and not seen
    (snapshot / "training_step.json").write_text('{"step": 5000}')  # the end of the first cycle
    assert main(["world", "build", "--out", str(tmp_path), "--stages", "base", "--init-base", str(snapshot)]) == 0
    assert seen[0].base.init_from == str(snapshot)


def test_scenes_are_deterministic_and_held_out_scenes_use_held_out_identities():
    a = random_scene(np.random.default_rng([1, 2]))
    b = random_scene(np.random.default_rng([1, 2]))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    held = random_scene(np.random.default_rng([1, 2]), held_out=True)
    assert all(is_held_out(s.identity) for s in held.subjects)


def test_reference_is_another_rendering_of_the_same_subject():
    rng = np.random.default_rng(0)
    scene = render_scene(rng, [SceneSubject("star", 630), SceneSubject("ring", 1050)], background="a grid")
    reference, mask = render_reference(rng, "star", 630)
    assert reference.shape == (SIZE, SIZE, 3) and mask.sum() > scene.masks[0].sum()  # larger
    own = descriptor(reference, mask)
    # the reference's pixels describe the star's identity, not the ring's
    assert descriptor_distance(own, descriptor(scene.image, scene.masks[0])) < descriptor_distance(
        own, descriptor(scene.image, scene.masks[1])
    )


@pytest.mark.slow
def test_identity_judgement_sees_the_pattern_on_clean_renderings():
    """On the world's own held-out scenes (true masks) the identity judgement accepts the true identity
    of nearly every subject, and rejects the same drawing asked as its colours swapped, transposed or
    mirrored (measured over 60 scenes: 130 of 131 accepted; with the evaluator's own regions over 100
    scenes, 96.7% accepted and 2.3%, 0% and 1.4% of the wrong ones). The colours-only figure, named as
    such, accepts the turned ones: it does not see the pattern."""
    from msdiffusion.world.evaluate import WRONG_IDENTITIES, judge_identity

    accepted = {"true": [], **{name: [] for name in WRONG_IDENTITIES}}
    colours_of_turned = []
    for i in range(40):
        scene = random_scene(np.random.default_rng([11, i]), held_out=True)
        for subject, mask in zip(scene.subjects, scene.masks):
            others = [s.identity for s in scene.subjects if s.identity != subject.identity]
            accepted["true"].append(
                identity_is_correct(scene.image, mask, AskedSubject(subject.cls, subject.identity, subject.box), others)
            )
            for name, wrong in WRONG_IDENTITIES.items():
                other = wrong(subject.identity)
                if other == subject.identity or other in look_alikes(subject.identity):
                    continue  # renders alike: nothing to reject
                colours, correct = judge_identity(
                    scene.image, mask, AskedSubject(subject.cls, other, subject.box), others
                )
                accepted[name].append(correct)
                if name != "swapped":
                    colours_of_turned.append(colours)
    assert np.mean(accepted["true"]) >= 0.95, np.mean(accepted["true"])
    for name in WRONG_IDENTITIES:
        assert len(accepted[name]) >= 20 and np.mean(accepted[name]) <= 0.05, (name, np.mean(accepted[name]))
    assert np.mean(colours_of_turned) >= 0.9


def test_wrong_identities_are_the_turned_and_swapped_renderings():
    from msdiffusion.world.evaluate import flipped, swapped, transposed

    def identity(a, b, pattern):
        return _PAIRS.index((COLOR_NAMES.index(a), COLOR_NAMES.index(b))) * len(PATTERNS) + PATTERNS.index(pattern)

    def render(i, turn=None):
        canvas = draw_background("plain", np.random.default_rng(0))
        draw_subject(canvas, "square", i, (32, 32), 40, 0.0)
        image = canvas.round().astype(np.uint8)
        return {None: image, "T": image.transpose(1, 0, 2), "F": image[:, ::-1]}[turn]

    for pattern in PATTERNS:
        i = identity("red", "blue", pattern)
        assert transposed(transposed(i)) == i and flipped(flipped(i)) == i and swapped(swapped(i)) == i
    # a square is its own transpose and mirror: the turned rendering is the turned identity's, pixel for pixel
    turns = (("halves", 0), "T", transposed), (("gradient", 0), "T", transposed), (("gradient", 0), "F", flipped)
    for pattern, turn, wrong in turns:
        i = identity("red", "blue", pattern)
        assert np.abs(render(i, turn).astype(int) - render(wrong(i)).astype(int)).max() <= 1, pattern
    assert transposed(identity("red", "blue", ("stripes", (0, 8)))) == identity("red", "blue", ("stripes", (90, 8)))
    assert flipped(identity("red", "blue", ("stripes", (45, 12)))) == identity("red", "blue", ("stripes", (135, 12)))
    assert flipped(identity("red", "blue", ("halves", 0))) == identity("blue", "red", ("halves", 0))


def test_descriptor_tells_directions_apart_and_look_alikes_render_alike():
    def render(identity):
        canvas = draw_background("plain", np.random.default_rng(0))
        mask = draw_subject(canvas, "square", identity, (32, 32), 40, 0.0)
        return canvas.round().astype(np.uint8), mask

    def identity(a, b, pattern):
        pair = _PAIRS.index((COLOR_NAMES.index(a), COLOR_NAMES.index(b)))
        return pair * len(PATTERNS) + PATTERNS.index(pattern)

    left_right, top_bottom = identity("red", "blue", ("halves", 0)), identity("red", "blue", ("halves", 90))
    swapped = identity("blue", "red", ("halves", 0))
    d = {i: descriptor(*render(i)) for i in (left_right, top_bottom, swapped)}
    assert descriptor_distance(d[left_right], d[top_bottom]) > 0.5
    assert descriptor_distance(d[left_right], d[swapped]) > 0.5
    assert look_alikes(left_right) == set()  # mirrored halves are told apart
    # a gradient from red to blue is the same picture as one from blue to red, reversed
    gradient = identity("red", "blue", ("gradient", 0))
    assert look_alikes(gradient) == {identity("blue", "red", ("gradient", 180))}
    (twin,) = look_alikes(gradient)
    assert np.abs(render(gradient)[0].astype(int) - render(twin)[0].astype(int)).max() <= 1


def test_connected_regions_and_iou():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    mask[5:8, 4:8] = True
    regions = connected_regions(mask)
    assert [int(r.sum()) for r in regions] == [12, 4]
    assert mask_box(regions[1]) == (1 / 8, 1 / 8, 3 / 8, 3 / 8)
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)


def test_held_out_samples_name_every_subject_and_take_turns_in_count():
    from msdiffusion.world.bench import held_out_samples

    samples = held_out_samples(8, seed=1)
    assert [len(s.subjects) for s in samples] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert len({s.sample_id for s in samples}) == 8
    for sample in samples:
        assert all(is_held_out(s.identity) for s in sample.subjects)
        assert all(s.phrase in sample.prompt for s in sample.subjects)
        assert all(s.source == f"{s.phrase}-{s.identity}" for s in sample.subjects)
    assert [s.subjects for s in held_out_samples(8, seed=1)] == [s.subjects for s in samples]  # a function of the seed


def test_world_dataset_is_an_ordinary_manifest(tmp_path):
    from msdiffusion.world.data import write_dataset

    manifest = write_dataset(tmp_path / "data", 12, seed=4, workers=1)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(lines) == 12
    assert all(not is_held_out(s["meta"]["identity"]) for line in lines for s in line["subjects"])
    again = write_dataset(tmp_path / "again", 12, seed=4, workers=2)  # same files whatever the workers
    assert again.read_text() == manifest.read_text()
    check = subprocess.run(
        [sys.executable, "-m", "msdiffusion", "data", "check", str(manifest)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "problems: none" in check.stdout


def test_world_training_state_resumes_exactly(tmp_path):
    """A stage stopped after its checkpoint continues with the same weights, optimiser and draws."""
    import torch

    from msdiffusion.world.base import resume_training_state, save_training_state

    def step(model, optimizer, generator):
        x = torch.randn(4, 3, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    step(model, optimizer, generator)
    save_training_state(tmp_path / "state.pt", {"model": model}, optimizer, generator, 1)
    step(model, optimizer, generator)

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_generator = torch.Generator()
    assert resume_training_state(tmp_path / "state.pt", {"model": fresh}, fresh_optimizer, fresh_generator) == 1
    step(fresh, fresh_optimizer, fresh_generator)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert resume_training_state(tmp_path / "missing.pt", {"model": fresh}, fresh_optimizer, fresh_generator) == 0


class _RunsCode:
    """A pickled object that runs code when loaded: what a hostile checkpoint file holds."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_resume_file_that_would_run_code_is_refused_not_run(tmp_path):
    """Resume files are read with `weights_only`: a checkpoint from someone else cannot execute code."""
    import pickle

    import torch

    from msdiffusion.world.base import resume_training_state

    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "step": _RunsCode(str(marker))}, tmp_path / "state.pt")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(pickle.UnpicklingError):
        resume_training_state(tmp_path / "state.pt", {}, torch.optim.AdamW(model.parameters()), torch.Generator())
    assert not marker.exists()


def test_placed_counts_any_shape_in_the_box_found_only_the_right_class():
    from msdiffusion.world.evaluate import Segmenter, WorldEvaluator, _label_map

    scene = render_scene(np.random.default_rng(5), [SceneSubject("star", 630)], background="a plain wall")
    labels = _label_map(scene)  # a perfect segmentation of the scene
    box = scene.subjects[0].box
    evaluator = WorldEvaluator(Segmenter())
    right, wrong_class, elsewhere = evaluator.evaluate(
        scene.image,
        [
            AskedSubject("star", 630, box),
            AskedSubject("ring", 630, box),
            AskedSubject("star", 630, (0.0, 0.0, 0.1, 0.1)),
        ],
        class_map=labels,
    )
    assert right.found and right.placed and right.identity_correct
    assert not wrong_class.found and wrong_class.placed
    assert not elsewhere.found and not elsewhere.placed


def test_a_shape_split_between_classes_counts_as_the_class_most_of_its_pixels_have():
    """The per-pixel map often marks a soft drawn shape's middle as one class and its points as
    others: the whole shape is found as its majority class, and only as that one."""
    from msdiffusion.world.evaluate import Segmenter, WorldEvaluator, _label_map
    from msdiffusion.world.scenes import mask_box

    scene = render_scene(np.random.default_rng(5), [SceneSubject("star", 630)], background="a plain wall")
    labels = _label_map(scene)
    star, ring, square = (1 + CLASSES.index(c) for c in ("star", "ring", "square"))
    rows = np.flatnonzero(labels.any(1))
    third = len(rows) // 3
    split = labels.copy()
    split[rows[:third]] = np.where(labels[rows[:third]] > 0, ring, 0)  # its top third marked "ring",
    split[rows[-third:]] = np.where(labels[rows[-third:]] > 0, square, 0)  # its bottom third "square"
    assert (split == star).sum() > max((split == ring).sum(), (split == square).sum())
    box = scene.subjects[0].box
    assert box_iou(mask_box(split == star), box) < 0.5  # no single-class region fills the box
    evaluator = WorldEvaluator(Segmenter())
    as_star, as_ring = evaluator.evaluate(
        scene.image, [AskedSubject("star", 630, box), AskedSubject("ring", 630, box)], class_map=split
    )
    assert as_star.found and as_star.identity_correct and as_star.iou > 0.9
    assert not as_ring.found


def test_ground_truth_check_asked_for_the_wrong_class_finds_nothing(monkeypatch):
    import msdiffusion.world.evaluate as evaluate_module
    from msdiffusion.world.evaluate import Segmenter, WorldEvaluator, _label_map, ground_truth_check

    scenes = {}
    real_random_scene = evaluate_module.random_scene

    def remembered(*args, **kwargs):
        scene = real_random_scene(*args, **kwargs)
        scenes[scene.image.tobytes()] = scene
        return scene

    evaluator = WorldEvaluator(Segmenter())
    real_evaluate = evaluator.evaluate
    monkeypatch.setattr(evaluate_module, "random_scene", remembered)
    # A perfect segmentation of each scene, so that only the asked classes differ between the runs.
    monkeypatch.setattr(
        evaluator,
        "evaluate",
        lambda image, asked: real_evaluate(image, asked, class_map=_label_map(scenes[image.tobytes()])),
    )
    right = ground_truth_check(evaluator, count=6)["all"]
    wrong = ground_truth_check(evaluator, count=6, wrong_class=True)["all"]
    assert right["found"] > 0.8 and wrong["found"] == 0.0
    assert wrong["placed"] == right["placed"]


def test_base_loss_covers_the_manifest_boxes():
    from msdiffusion.train.loss import box_cover
    from msdiffusion.world.base import entry_boxes

    boxed = [SimpleNamespace(box=(0.0, 0.0, 0.5, 0.25)), SimpleNamespace(box=(0.375, 0.625, 1.0, 1.0))]
    entries = [SimpleNamespace(subjects=boxed), SimpleNamespace(subjects=[])]
    boxes = entry_boxes(entries)
    assert boxes.shape == (2, 2, 4) and boxes[1].eq(0).all()  # padded with boxes that cover nothing
    cover = box_cover(boxes, 8, 8)
    assert cover[0].sum() == 2 * 4 + 3 * 5 and cover[1].sum() == 0


def test_base_draws_scenes_of_the_classes_asked_more_often(tmp_path, monkeypatch):
    from msdiffusion.data.manifest import write_manifest
    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe, _Captions, scene_sampling_weights, train_base
    from msdiffusion.world.data import MANIFEST, _write_scenes, read_world_manifest

    def entry(*phrases):
        return SimpleNamespace(subjects=[SimpleNamespace(phrase=p) for p in phrases])

    entries = [entry("hourglass", "star"), entry("ring"), entry()]
    assert scene_sampling_weights(entries, ()) is None  # every scene as often: the earlier builds' draws
    assert scene_sampling_weights(entries, (("star", 1.0),)) is None
    assert scene_sampling_weights(entries, (("hourglass", 3.0),)).tolist() == [3.0, 1.0, 1.0]
    assert scene_sampling_weights(entries, (("hourglass", 3.0), ("star", 5.0), ("ring", 0.5))).tolist() == [
        5.0,
        0.5,
        1.0,
    ]

    data = tmp_path / "data"
    for sub in ("images", "references"):
        (data / sub).mkdir(parents=True)
    manifest = data / MANIFEST
    write_manifest([sample for _, sample in _write_scenes(data, 0, range(6))], manifest)
    classes = [{s.phrase for s in e.subjects} for e in read_world_manifest(manifest)]
    favoured = next(c for c in sorted(set().union(*classes)) if sum(c in scene for scene in classes) <= 2)
    drawn = []
    pick = _Captions.pick
    monkeypatch.setattr(
        _Captions, "pick", lambda self, index, *a: drawn.extend(index.tolist()) or pick(self, index, *a)
    )
    torch.manual_seed(0)
    recipe = BaseRecipe(
        unet_channels=(16, 16, 32),
        unet_batch=8,
        warmup_steps=1,
        checkpoint_every=100,
        cycles=((3, 1e-3, 0.0),),
        class_sampling=((favoured, 1e6),),
    )
    ema = train_base(manifest, models.vae().eval(), tmp_path / "out", recipe, log=lambda *_: None)
    assert len(drawn) == 24 and all(favoured in classes[i] for i in drawn)
    record = json.loads((tmp_path / "out" / "snapshots" / "step-3" / "training_step.json").read_text())
    assert record["class_sampling"] == [[favoured, 1e6]] and ema is not None


@pytest.mark.slow
def test_base_writes_a_snapshot_at_each_cycle_end_and_restarts_warm_from_one(tmp_path):
    from dataclasses import replace

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from msdiffusion.data.manifest import write_manifest
    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe, _Base, load_snapshot, snapshot_from_checkpoint, train_base
    from msdiffusion.world.data import MANIFEST, _write_scenes

    data = tmp_path / "data"
    for sub in ("images", "references"):
        (data / sub).mkdir(parents=True)
    manifest = data / MANIFEST
    write_manifest([sample for _, sample in _write_scenes(data, 0, range(4))], manifest)
    torch.manual_seed(0)
    vae = models.vae().eval()
    recipe = BaseRecipe(
        unet_channels=(16, 16, 32),
        unet_batch=2,
        warmup_steps=2,
        checkpoint_every=1,
        cycles=((2, 1e-3, 0.0), (2, 1e-3, 0.0), (1, 1e-3, 0.5)),
        subject_loss_weight=3.0,
    )
    train_base(manifest, vae, tmp_path / "first", recipe, log=lambda *_: None)
    snapshots = tmp_path / "first" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-2", "step-4", "step-5"]
    assert json.loads((snapshots / "step-2" / "training_step.json").read_text())["step"] == 2
    # each snapshot samples with the schedule it trained on (v prediction), and `msdiff train` reads it there
    config = DDPMScheduler.from_pretrained(snapshots / "step-4", subfolder="scheduler").config
    assert (config.prediction_type, config.timestep_spacing) == ("v_prediction", "leading")
    (snapshots / "step-5" / "training_step.json").unlink()  # as if stopped while writing the last snapshot
    train_base(manifest, vae, tmp_path / "first", recipe, log=lambda *_: None)  # resumes at the end: writes it
    assert json.loads((snapshots / "step-5" / "training_step.json").read_text())["step"] == 5
    # the last checkpoint's EMA is the last snapshot
    again = snapshot_from_checkpoint(
        tmp_path / "first" / "base-checkpoint.pt", vae, tmp_path / "again", tmp_path / "first" / "tokenizer", recipe
    )
    last, exported = (
        UNet2DConditionModel.from_pretrained(f / "unet").state_dict() for f in (snapshots / "step-5", again)
    )
    assert all(torch.equal(tensor, exported[name]) for name, tensor in last.items())

    # a warm restart loads the snapshot's weights and trains the cycles after it
    warm = replace(recipe, init_from=str(snapshots / "step-2"))
    tokenizer, _ = models.tokenizers(tmp_path / "tok")
    model = _Base(models.unet(recipe.unet_channels), *models.text_encoders(tokenizer))
    assert load_snapshot(model, warm) == 2
    saved = UNet2DConditionModel.from_pretrained(snapshots / "step-2" / "unet", torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.unet.state_dict().items())
    logs = []
    train_base(manifest, vae, tmp_path / "second", warm, log=logs.append)
    assert any("warm restart" in line and "at step 2" in line for line in logs)
    assert torch.load(tmp_path / "second" / "base-checkpoint.pt", weights_only=False)["step"] == 5
    assert sorted(p.name for p in (tmp_path / "second" / "snapshots").iterdir()) == ["step-4", "step-5"]

    # a snapshot that ends no cycle before the last, or of another UNet, is refused with the reason
    with pytest.raises(ValueError, match="not the end of one of this recipe's cycles"):
        load_snapshot(model, replace(recipe, init_from=str(snapshots / "step-5")))
    with pytest.raises(ValueError, match="unet_channels"):
        load_snapshot(model, replace(warm, unet_channels=(16, 32, 32)))
    assert load_snapshot(model, replace(recipe, init_from=str(snapshots / "step-4"))) == 4
    with pytest.raises(FileNotFoundError, match="training_step.json"):
        load_snapshot(model, replace(recipe, init_from=str(tmp_path)))
    bare = tmp_path / "bare"  # a record from before snapshots named their UNet
    bare.mkdir()
    (bare / "training_step.json").write_text('{"step": 2}')
    with pytest.raises(ValueError, match="channels None.*base.unet_channels"):
        load_snapshot(model, replace(recipe, init_from=str(bare)))


def test_a_warm_restart_refuses_a_snapshot_of_other_words(tmp_path, monkeypatch):
    """A token embedding row means a word through its id: a snapshot taken when the world had other
    words cannot be continued (the build starts from scratch instead)."""
    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe, _Base, load_snapshot, save_snapshot

    recipe = BaseRecipe(unet_channels=(16, 16, 32), cycles=((2, 1e-3, 0.0), (2, 1e-3, 0.0)))
    words = models.VOCABULARY
    monkeypatch.setattr(models, "VOCABULARY", sorted({*words, "hexagon"} - {"hourglass"}))
    old_tokenizer, _ = models.tokenizers(tmp_path / "old")
    torch.manual_seed(0)
    old = _Base(models.unet(recipe.unet_channels), *models.text_encoders(old_tokenizer))
    snapshot = save_snapshot(old, models.vae(), tmp_path / "snapshot", tmp_path / "old", 2, recipe)
    monkeypatch.setattr(models, "VOCABULARY", words)
    tokenizer, _ = models.tokenizers(tmp_path / "new")
    model = _Base(models.unet(recipe.unet_channels), *models.text_encoders(tokenizer))
    restart = BaseRecipe(unet_channels=recipe.unet_channels, cycles=recipe.cycles, init_from=str(snapshot))
    with pytest.raises(ValueError, match="the world's words changed"):
        load_snapshot(model, restart)


def test_a_build_restarted_from_a_snapshot_takes_its_vae_and_refuses_another(tmp_path):
    from diffusers import AutoencoderKL

    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe, _Base, save_snapshot
    from msdiffusion.world.recipe import WorldRecipe, build, check_same_vae

    recipe = BaseRecipe(unet_channels=(16, 16, 32), cycles=((2, 1e-3, 0.0), (2, 1e-3, 0.0)))
    tokenizer, _ = models.tokenizers(tmp_path / "tok")
    torch.manual_seed(0)
    vae = models.vae()
    snapshot = save_snapshot(
        _Base(models.unet(recipe.unet_channels), *models.text_encoders(tokenizer)),
        vae,
        tmp_path / "snapshot",
        tmp_path / "tok",
        2,
        recipe,
    )
    recipe.init_from = str(snapshot)
    build(tmp_path / "out", WorldRecipe(base=recipe), stages=("vae",), log=lambda *_: None)
    copied = AutoencoderKL.from_pretrained(tmp_path / "out" / "base-train" / "vae")
    assert copied.dtype == torch.float32
    theirs = AutoencoderKL.from_pretrained(snapshot / "vae")
    check_same_vae(copied, theirs, snapshot)  # the same VAE passes
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="is not the VAE of"):
        check_same_vae(models.vae(), theirs, snapshot)


def test_base_schedule_is_a_cosine_then_warm_restarts():
    from msdiffusion.world.base import BaseRecipe, _base_lr

    recipe = BaseRecipe(warmup_steps=10, cycles=((100, 1e-3, 0.0), (50, 4e-4, 0.0), (20, 1e-4, 0.5)))
    assert _base_lr(0, recipe) == pytest.approx(1e-4) and _base_lr(9, recipe) == pytest.approx(1e-3)
    assert _base_lr(55, recipe) == pytest.approx(5e-4)  # half-way down the first cosine
    assert _base_lr(99, recipe) < 1e-6  # the first cycle ends near zero...
    assert _base_lr(100, recipe) == pytest.approx(4e-4)  # ...and the second starts at its peak
    assert _base_lr(125, recipe) == pytest.approx(2e-4, rel=0.05)
    assert _base_lr(149, recipe) < 1e-6
    assert _base_lr(150, recipe) == pytest.approx(1e-4)  # and the third at its own
    with pytest.raises(ValueError, match="past the recipe's 170 steps"):
        _base_lr(170, recipe)


def test_base_captions_describe_every_identity_differently_in_words_the_tokenizer_knows(tmp_path):
    from msdiffusion.world import models

    words = {identity_words(i) for i in range(NUM_IDENTITIES)}
    assert len(words) == NUM_IDENTITIES  # a description names exactly one identity
    a, b, _ = identity_parts(0)
    assert identity_words(0).startswith(f"{a} {b} ")  # first colour first
    assert caption_for(["star", "ring"], "a grid") == "a star and a ring on a grid"
    described = caption_for(["star", "ring"], "a grid", [0, 1])
    assert described == f"a {identity_words(0)} star and a {identity_words(1)} ring on a grid"
    tokenizer, _ = models.tokenizers(tmp_path)
    ids = tokenizer(described).input_ids[1:-1]
    assert len(ids) == len(described.split())  # one token per word: none is split into pieces
    assert tokenizer.unk_token_id not in ids


def test_base_batches_mix_described_plain_and_empty_captions(tmp_path):
    import torch

    from msdiffusion.world import models
    from msdiffusion.world.base import _Captions

    entries = []
    for i in range(3):
        scene = random_scene(np.random.default_rng([5, i]))
        subjects = [SimpleNamespace(phrase=s.cls, meta={"identity": s.identity}) for s in scene.subjects]
        entries.append(SimpleNamespace(caption=scene.caption, meta={"background": scene.background}, subjects=subjects))
    tokenizer, tokenizer_2 = models.tokenizers(tmp_path)
    captions = _Captions(entries, tokenizer, tokenizer_2)
    keep = torch.tensor([[True], [True], [False]])
    describe = torch.tensor([[True], [False], [True]])
    for tok, ids in zip((tokenizer, tokenizer_2), captions.pick(torch.arange(3), keep, describe)):
        texts = [
            tok.decode([i for i in row.tolist() if i != tok.pad_token_id], skip_special_tokens=True).replace(" ,", ",")
            for row in ids
        ]
        subjects = entries[0].subjects
        assert texts[0] == caption_for(
            [s.phrase for s in subjects], entries[0].meta["background"], [s.meta["identity"] for s in subjects]
        )
        assert texts[1] == entries[1].caption
        assert texts[2] == ""


def test_base_unet_width_is_a_recipe_setting():
    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe

    assert BaseRecipe().unet_channels == models.UNET_CHANNELS == (64, 96, 128)
    narrow = models.unet((32, 64, 128))
    assert tuple(narrow.config.block_out_channels) == (32, 64, 128)
    assert models.parameter_count(narrow) < models.parameter_count(models.unet())


def test_world_unet_attends_at_every_level_and_the_subject_tokens_reach_the_16x16_cells():
    """A world subject spans 2 to 4 cells at 8x8: the subject tokens must also act at 16x16 (docs/world.md)."""
    from msdiffusion.adapter import attach_ms_attention, cross_attention_levels
    from msdiffusion.attention import MSAttnProcessor
    from msdiffusion.world import models
    from msdiffusion.world.base import BaseRecipe

    assert BaseRecipe().unet_attention == models.UNET_ATTENTION == (True, True, True)
    sdxl_like = models.unet(attention=(False, True, True))
    assert sdxl_like.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert sdxl_like.config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

    unet = models.unet()
    attach_ms_attention(unet)
    assert cross_attention_levels(unet) == (0, 1, 2)
    processors = unet.attn_processors
    assert isinstance(processors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"], MSAttnProcessor)
    assert isinstance(processors["up_blocks.2.attentions.2.transformer_blocks.0.attn2.processor"], MSAttnProcessor)


def test_ground_truth_check_through_a_vae_scores_the_round_trip_images():
    """With `vae`, each scene is scored after its round trip (benchmarks/world_vae_ceiling.py): a lossless
    VAE gives back the rendered pixels exactly, a VAE that decodes to grey gives grey images."""
    from types import SimpleNamespace

    from msdiffusion.world.evaluate import Segmenter, WorldEvaluator, ground_truth_check

    class Lossless:
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    class Grey(Lossless):
        def decode(self, z):
            return SimpleNamespace(sample=torch.zeros_like(z))

    seen = []
    evaluator = WorldEvaluator(Segmenter())
    evaluator.evaluate = lambda image, asked: seen.append(image) or []
    ground_truth_check(evaluator, count=3)
    ground_truth_check(evaluator, count=3, vae=Lossless())
    ground_truth_check(evaluator, count=3, vae=Grey())
    rendered, lossless, grey = seen[:3], seen[3:6], seen[6:]
    assert all(np.array_equal(a, b) for a, b in zip(rendered, lossless))
    assert all(
        image.dtype == np.uint8 and image.shape == a.shape and set(np.unique(image)) <= {127, 128}
        for image, a in zip(grey, rendered)
    )


def test_breakdowns_and_targets_count_the_right_subjects():
    from msdiffusion.world.evaluate import SubjectResult, against_targets, breakdown

    def result(cls: str, identity: int, found: bool, correct: bool) -> SubjectResult:
        return SubjectResult(cls, identity, (0, 0, 1, 1), found, 0.9 if found else 0.0, correct, 0.0, None, found)

    dots = next(i for i in range(NUM_IDENTITIES) if identity_parts(i)[2][0] == "dots")
    border = next(i for i in range(NUM_IDENTITIES) if identity_parts(i)[2][0] == "border")
    results = [
        [result("star", dots, True, True)],  # 1 subject
        [result("ring", border, True, False), result("star", border, False, False)],  # 2 subjects
        [result("ring", dots, False, True)] * 4,  # 4 subjects
    ]
    by_pattern = breakdown(results, "pattern")
    assert {k: (v["subjects"], v["identity_correct"]) for k, v in by_pattern.items()} == {
        "border": (2, 0.0),
        "dots": (5, 1.0),
    }
    by_class = breakdown(results, "class")
    assert {k: (v["subjects"], v["found"]) for k, v in by_class.items()} == {"ring": (5, 0.2), "star": (2, 0.5)}
    with pytest.raises(ValueError, match="pattern, class, size"):
        breakdown(results, "colour")
    # By the box's longer side in px of the 64 px image, 6 px to a group, in order of size.
    sized = [
        [dataclasses.replace(r, box=box) for r, box in zip(image, boxes)]
        for image, boxes in zip(
            results,
            (
                [(0, 0, 0.25, 0.1)],  # 16 px
                [(0.5, 0.5, 0.78, 0.7), (0, 0, 0.2, 0.45)],  # 17.9 and 28.8 px
                [(0.1, 0.1, 0.7, 0.6)] * 4,  # 38.4 px
            ),
        )
    ]
    by_size = breakdown(sized, "size")
    assert list(by_size) == ["12-17 px", "24-29 px", "36-41 px"]
    assert [v["subjects"] for v in by_size.values()] == [2, 1, 4]

    targets = {t["target"]: t for t in against_targets(results)}
    one_two, four, identity = targets.values()
    assert (one_two["subjects"], one_two["measured"], one_two["met"]) == (3, 2 / 3, False)
    assert (four["subjects"], four["measured"], four["met"]) == (4, 0.0, False)
    assert (identity["subjects"], identity["measured"], identity["met"]) == (7, 5 / 7, False)
    assert against_targets([[result("star", dots, True, True)] * 4])[1]["met"] is True
    assert not any(t["met"] for t in against_targets([]))
