"""The world's whole recipe: data, VAE, base, image encoder, evaluator, adapter, export.

`msdiff world build --recipe recipes/world/shipped.yaml --out runs/world` runs every stage that is
not finished yet, in order, with fixed seeds, and prints how long each took. A recipe file holds
`WorldRecipe`'s fields (the base's under `base:`, the image encoder's under `image_encoder:`); what
it leaves out keeps the defaults below. Each stage writes its result under `--out`; the long ones
(VAE, base, adapter) checkpoint as they go, so a run that is stopped resumes where it was (the
adapter through `msdiff train --resume-from-checkpoint latest`), with the settings they began with.
`--reuse FOLDER` links the stages another build finished with the same settings instead of running
them; FOLDER may also be an export (the package's shipped weights among them), which lends its models.
The export stage writes the weights to `OUT/export`; shipping them is an explicit copy into the
package (docs/world.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import did_you_mean
from . import models
from .base import BaseRecipe, save_base, train_base, train_vae
from .data import MANIFEST, write_dataset
from .image_encoder import ImageEncoderRecipe, train_image_encoder

STAGES = ("data", "vae", "base", "image_encoder", "evaluator", "adapter", "export")


class RecipeMismatchError(ValueError):
    """A build folder whose stages were made with other settings than those asked for now."""


# The recipe fields each stage reads (`base` holds the VAE's too). A stage begun in an earlier sitting
# resumes from its checkpoint, so it must go on with the fields it began with.
STAGE_FIELDS = {
    "data": ("num_scenes", "seed"),
    "vae": ("base",),
    "base": ("num_scenes", "base"),
    "image_encoder": ("image_encoder",),
    "evaluator": ("segmenter_steps", "seed"),
    "adapter": ("adapter_steps", "adapter_batch", "adapter_lr", "adapter_high_noise_share", "seed"),
}
# What a finished stage leaves in a build folder: the path `build(reuse=...)` links, and the file
# whose existence marks the stage finished.
STAGE_OUTPUTS = {
    "data": ("data", "data/" + MANIFEST),
    "vae": ("base-train/vae", "base-train/vae/config.json"),
    "base": ("base", "base/model_index.json"),
    "image_encoder": ("image_encoder", "image_encoder/config.json"),
    "evaluator": ("evaluator.safetensors", "evaluator.safetensors"),
    "adapter": ("adapter-train", "adapter-train/adapter"),
}
# What an export (`export`: the shipped weights' layout) lends to `--reuse`: its models, each where a
# build folder keeps it. Not the data, which its recipe's seed makes again here, nor the adapter,
# which an export keeps in its shipped form rather than as a training run.
EXPORTED_OUTPUTS = {
    "vae": ("base/vae", "base/vae/config.json"),
    "base": ("base", "base/model_index.json"),
    "image_encoder": ("image_encoder", "image_encoder/config.json"),
    "evaluator": ("evaluator.safetensors", "evaluator.safetensors"),
}
# The stages whose outputs a stage reads: it is linked only where those are linked from the same folder.
STAGE_INPUTS = {"base": ("data", "vae"), "evaluator": ("vae",), "adapter": ("data", "base", "image_encoder")}


@dataclass
class WorldRecipe:
    num_scenes: int = 24000
    base: BaseRecipe = field(default_factory=BaseRecipe)
    # Trained contrastively on the world: an adapter on it gets more identities than on a random one.
    image_encoder: ImageEncoderRecipe = field(default_factory=ImageEncoderRecipe)
    segmenter_steps: int = 1200
    # `msdiff train` settings of the adapter (the rest are the release's defaults)
    adapter_steps: int = 3000
    adapter_batch: int = 32
    adapter_lr: float = 3e-4
    # Half of the adapter's timesteps from the noisier half, where the subject tokens decide shapes
    # (found and identity both gain a few points); `msdiff train` draws uniformly by default.
    adapter_high_noise_share: float = 0.5
    adapter_checkpoint_every: int = 250
    seed: int = 0


def adapter_config(out: Path, recipe: WorldRecipe) -> dict:
    """The `msdiff train` config of the world's adapter (written to `out/adapter.yaml`)."""
    config = {
        "base": str(out / "base"),
        "image_encoder": str(out / "image_encoder"),
        "manifest": str(out / "data" / MANIFEST),
        "resolution": models.SIZE,
        "max_subjects": 4,
        "crop": "center",  # scenes are already at the training size: nothing to crop
        "mask_references": False,  # references keep their backgrounds: demo references have one too
        "dataloader_workers": 0,  # 2 cores: a worker process would compete with the training threads
        "pin_memory": False,
        "resampler": {
            k: v for k, v in asdict(models.RESAMPLER).items() if k not in ("embedding_dim", "output_dim", "phrase_dim")
        },
        "learning_rate": recipe.adapter_lr,
        "high_noise_share": recipe.adapter_high_noise_share,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "train_batch_size": recipe.adapter_batch,
        "max_train_steps": recipe.adapter_steps,
        "seed": recipe.seed,
        "output_dir": str(out / "adapter-train"),
        "checkpointing_steps": recipe.adapter_checkpoint_every,
        "checkpoints_total_limit": 2,
        "log_every": 25,
        "report_to": "none",
        "validation_steps": 0,
    }
    return config


def build(
    out: str | Path,
    recipe: WorldRecipe | None = None,
    stages: tuple[str, ...] = STAGES,
    export_to: str | Path | None = None,
    reuse: str | Path | None = None,
    log: Callable = print,
) -> dict:
    """Run the recipe's unfinished stages; returns {stage: seconds} for the stages run now. With
    `reuse` (another build folder), each stage finished there with the same settings and inputs is
    linked instead of run: a variant of one stage (say, the adapter's steps) trains that stage alone."""
    recipe = recipe or WorldRecipe()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timings_file = out / "timings.json"
    recorded = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    # What made each output: a stage's entry is the recipe of its latest sitting, so a later call
    # with other flags for other stages does not rewrite the record of the finished ones.
    recipes_file = out / "recipe.json"
    recipes = json.loads(recipes_file.read_text()) if recipes_file.exists() else {}
    if not set(recipes) <= {*STAGES, "earlier sittings"}:  # the one-recipe record of earlier versions
        recipes = {"earlier sittings": recipes}

    if reuse is not None:
        theirs = Path(reuse).resolve()
        for name, (record, source) in _reusable(theirs, out, recipe, stages, recipes).items():
            path = STAGE_OUTPUTS[name][0]
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).symlink_to(source)
            recipes[name] = record
            recipes_file.write_text(json.dumps(recipes, indent=2) + "\n")
            log(f"[{name}] linked from {source}")

    def stage(name: str, work: Callable[[], None]) -> None:
        if name not in stages:
            return
        if name in STAGE_OUTPUTS and (out / STAGE_OUTPUTS[name][1]).exists():
            log(f"[{name}] done already")
            return
        if name in recipes:  # begun in an earlier sitting
            changed = changed_fields(recipes[name], asdict(recipe), STAGE_FIELDS.get(name, ()))
            if changed:
                raise RecipeMismatchError(
                    f"{out}: its {name} stage was begun with another recipe ({'; '.join(changed)}) and resumes "
                    "from its checkpoint: run it with the recipe it began with (the same --recipe file), or "
                    "build this recipe in a fresh --out."
                )
        log(f"[{name}] ...")
        recipes[name] = asdict(recipe)
        recipes_file.write_text(json.dumps(recipes, indent=2) + "\n")
        start = time.perf_counter()
        work()
        timings[name] = time.perf_counter() - start
        recorded[name] = recorded.get(name, 0.0) + timings[name]  # a resumed stage adds up its sittings
        timings_file.write_text(json.dumps(recorded, indent=2) + "\n")
        log(f"[{name}] {timings[name]:.0f} s")

    manifest = out / "data" / MANIFEST
    stage("data", lambda: write_dataset(out / "data", recipe.num_scenes, recipe.seed))
    work = out / "base-train"
    snapshot = Path(recipe.base.init_from) if recipe.base.init_from else None

    def vae_stage() -> None:
        if snapshot is None:
            train_vae(work, recipe.base, log)
            return
        from diffusers import AutoencoderKL

        # A base restarted from a snapshot must keep the latents it was trained on: its own VAE.
        AutoencoderKL.from_pretrained(snapshot / "vae", torch_dtype=torch.float32).save_pretrained(work / "vae")
        log(f"  the VAE of {snapshot}")

    stage("vae", vae_stage)

    def base_stage() -> None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(work / "vae")
        if snapshot is not None:
            check_same_vae(vae, AutoencoderKL.from_pretrained(snapshot / "vae"), snapshot)
        save_base(train_base(manifest, vae, work, recipe.base, log), vae, out / "base", work / "tokenizer")

    stage("base", base_stage)

    def image_encoder_stage() -> None:
        encoder = train_image_encoder(recipe.image_encoder, log)
        encoder.to(torch.float16).save_pretrained(out / "image_encoder")
        models.image_processor().save_pretrained(out / "image_encoder")

    stage("image_encoder", image_encoder_stage)

    def evaluator_stage() -> None:
        from diffusers import AutoencoderKL

        from ..atomic import atomic_path
        from .evaluate import save_segmenter, train_segmenter

        vae = AutoencoderKL.from_pretrained(work / "vae")
        segmenter = train_segmenter(vae, recipe.segmenter_steps, seed=recipe.seed, log=log)
        with atomic_path(out / "evaluator.safetensors") as tmp:  # its existence marks the stage done
            save_segmenter(segmenter, tmp)

    stage("evaluator", evaluator_stage)

    def adapter_stage() -> None:
        import yaml

        config = out / "adapter.yaml"
        config.write_text(yaml.safe_dump(adapter_config(out, recipe), sort_keys=False))
        command = [sys.executable, "-m", "msdiffusion", "train", "--config", str(config)]
        if any((out / "adapter-train").glob("checkpoint-*")):
            command += ["--resume-from-checkpoint", "latest"]
        log("  " + " ".join(command))
        subprocess.run(command, check=True)

    stage("adapter", adapter_stage)
    stage("export", lambda: export(out, export_to or out / "export", log=log))
    return timings


def _reusable(theirs: Path, out: Path, recipe: WorldRecipe, stages: tuple[str, ...], begun: dict) -> dict:
    """{stage: (its record there, the path to link)} for the stages to link from `theirs`, a build folder
    or an export: asked for, finished there with this recipe's fields, not begun here, and reading only
    outputs linked from there too (or, from an export, data made here with the same fields)."""
    record_file = theirs / "recipe.json"
    if not record_file.is_file():
        raise RecipeMismatchError(
            f"--reuse: {theirs} is neither a world build folder nor an export of one (no recipe.json)."
        )
    record = json.loads(record_file.read_text())
    exported = is_export(theirs)
    outputs = EXPORTED_OUTPUTS if exported else STAGE_OUTPUTS

    def same_fields(name: str) -> bool:
        return name in record and not changed_fields(record[name], asdict(recipe), STAGE_FIELDS[name])

    def linked(name: str) -> bool:
        if exported and name == "data":  # made here (now or in an earlier sitting) by the same seed: the same scenes
            here = begun.get("data", asdict(recipe) if "data" in stages else None)
            return (
                same_fields("data")
                and here is not None
                and not changed_fields(here, asdict(recipe), STAGE_FIELDS["data"])
            )
        if name in chosen:
            return True
        marker = out / STAGE_OUTPUTS[name][1]
        return marker.exists() and name in outputs and marker.resolve() == (theirs / outputs[name][1]).resolve()

    chosen: dict = {}
    for name, (path, marker) in outputs.items():
        if (
            name in stages
            and name not in begun
            and (theirs / marker).exists()
            and same_fields(name)
            and all(linked(i) for i in STAGE_INPUTS.get(name, ()))
        ):
            chosen[name] = (record[name], theirs / path)
    return chosen


def is_export(folder: Path) -> bool:
    """Whether `folder` is laid out as `export` writes (the shipped weights), not as a build folder."""
    return (folder / "adapter").is_dir() and (folder / "base").is_dir() and not (folder / "base-train").exists()


def changed_fields(earlier: dict, now: dict, names: tuple[str, ...]) -> list[str]:
    """`field: earlier -> now` for each of `names` (and each field of a nested recipe) that differs.

    A field the earlier record lacks counts as its default: the record was written before the field
    existed, and a new field's default is what the code did before it.
    """
    defaults = json.loads(json.dumps(asdict(WorldRecipe())))
    earlier, now = json.loads(json.dumps(earlier)), json.loads(json.dumps(now))  # tuples as the record's lists
    changed = []
    for name in names:
        old, new = earlier.get(name, defaults.get(name)), now.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            old = {**(defaults.get(name) or {}), **old}
            changed += [f"{name}.{k}: {old.get(k)} -> {new.get(k)}" for k in {**old, **new} if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(f"{name}: {old} -> {new}")
    return changed


def check_same_vae(vae, snapshot_vae, snapshot: Path) -> None:
    """A warm restart on another VAE's latents would train the base on a different problem: refuse it."""
    theirs = snapshot_vae.state_dict()
    same = vae.config.scaling_factor == snapshot_vae.config.scaling_factor and all(
        name in theirs and torch.equal(tensor.to(theirs[name].dtype), theirs[name])
        for name, tensor in vae.state_dict().items()
    )
    if not same:
        raise RecipeMismatchError(
            f"base-train/vae is not the VAE of {snapshot} (the base there was trained on that VAE's latents): "
            "use a fresh --out, whose vae stage copies the snapshot's."
        )


def export(out: str | Path, destination: str | Path, log: Callable = print) -> Path:
    """Copy the trained models to `destination` (fp16), laid out as the package's shipped weights."""
    from ..adapter import MSAdapterCheckpoint, load_checkpoint

    out = Path(out)
    destination = Path(destination)
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    shutil.copytree(out / "base", destination / "base")
    shutil.copytree(out / "image_encoder", destination / "image_encoder")
    shutil.copy(out / "evaluator.safetensors", destination / "evaluator.safetensors")
    # What made each model, so that `--reuse` can lend them to a variant (read by `_reusable`).
    shutil.copy(out / "recipe.json", destination / "recipe.json")
    trained = load_checkpoint(out / "adapter-train" / "adapter")
    MSAdapterCheckpoint(
        {k: v.half() for k, v in trained.image_proj.items()},
        {i: {k: v.half() for k, v in weights.items()} for i, weights in trained.attention.items()},
        trained.dummy_image_tokens.half(),
        trained.resampler_config,
    ).save(destination / "adapter")
    size = sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())
    log(f"exported to {destination} ({size / 2**20:.1f} MiB)")
    return destination


# ---- recipe files ------------------------------------------------------------------------------------
def _from_mapping(cls, data: Any, where: str):
    """A recipe dataclass from a mapping, refusing unknown fields by name (with the close match)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__}'s fields, got {data!r}.")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in data.items():
        if name not in known:
            raise ValueError(f"{where}: unknown field {name!r}{did_you_mean(name, known)}; fields: {', '.join(known)}.")
        if name == "base":
            value = _from_mapping(BaseRecipe, value, f"{where}: base")
        elif name == "image_encoder":
            value = _from_mapping(ImageEncoderRecipe, value, f"{where}: image_encoder")
        elif isinstance(value, list):  # YAML lists are the recipes' tuples (cycles, channels, class sampling)
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[name] = value
    return cls(**values)


def read_recipe(path: str | Path) -> WorldRecipe:
    """A recipe file (YAML): `WorldRecipe`'s fields, the base's under `base:`, the image encoder's under
    `image_encoder:`; fields it leaves out keep their defaults, or with `extends: OTHER.yaml` (a path
    relative to the file) those of that recipe, so that a variant says only what it changes."""
    recipe = _from_mapping(WorldRecipe, _recipe_mapping(Path(path), ()), str(path))
    problems = recipe_problems(recipe)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + ".")
    return recipe


def _recipe_mapping(path: Path, seen: tuple[Path, ...]) -> dict:
    """A recipe file's fields merged over those of the recipe it extends (nested mappings field by field)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} not found (the shipped ones are in recipes/world/).")
    if path.resolve() in seen:
        raise ValueError(f"{path}: `extends` comes back to this file ({' -> '.join(map(str, seen))}).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    extended = data.pop("extends")
    if not isinstance(extended, str):
        raise ValueError(f"{path}: extends: a recipe file's path, relative to this file; got {extended!r}.")
    merged = _recipe_mapping(path.parent / extended, (*seen, path.resolve()))
    for name, value in data.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(name), dict)
        merged[name] = {**merged[name], **value} if both_mappings else value
    return merged


def recipe_problems(recipe: WorldRecipe) -> list[str]:
    """What in a recipe cannot be built, each naming the field."""
    from .scenes import CLASSES

    problems = []
    base = recipe.base
    channels = base.unet_channels
    if len(channels) != 3 or not all(isinstance(c, int) and c >= 16 and c % 16 == 0 for c in channels):
        problems.append(
            f"base.unet_channels: three multiples of 16 (the UNet's norm groups), like [64, 96, 128]; got {list(channels)}"
        )
    if not base.cycles:
        problems.append("base.cycles: at least one [steps, learning rate, high-noise share]")
    for k, cycle in enumerate(base.cycles):
        ok = len(cycle) == 3 and isinstance(cycle[0], int) and cycle[0] >= 1 and cycle[1] > 0 and 0 <= cycle[2] <= 1
        if not ok:
            problems.append(
                f"base.cycles[{k}]: [steps >= 1, learning rate > 0, high-noise share in [0, 1]]; got {list(cycle)}"
            )
    for k, entry in enumerate(base.class_sampling):
        if (
            len(entry) != 2
            or entry[0] not in CLASSES
            or not (isinstance(entry[1], (int, float)) and 0 < entry[1] < float("inf"))
        ):
            problems.append(
                f"base.class_sampling[{k}]: [class, factor > 0] with a class of {', '.join(CLASSES)}; got {list(entry)}"
            )
    if not base.subject_loss_weight >= 0:
        problems.append(f"base.subject_loss_weight: a number >= 0 (0 is a plain mean); got {base.subject_loss_weight}")
    for name in ("num_scenes", "segmenter_steps", "adapter_steps", "adapter_batch"):
        if not (isinstance(getattr(recipe, name), int) and getattr(recipe, name) >= 1):
            problems.append(f"{name}: a positive integer; got {getattr(recipe, name)!r}")
    return problems
