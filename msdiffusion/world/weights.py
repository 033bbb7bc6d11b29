"""Where a world build's models lie, and a pipeline of them through the one loader.

The shipped weights are the named set `msdiff-world` (`msdiffusion.loading`); a build's own
folder (`msdiff world build --out`, or what its export wrote) is read with `world_models_folder`.
"""

from __future__ import annotations

from pathlib import Path

from ..loading import world_model_paths


def world_models_folder(folder: str | Path) -> dict[str, str]:
    """{base, adapter, image_encoder, evaluator} of another folder of world models: laid out as the
    shipped weights (what `msdiff world build --export-to` writes), or a finished `--out` folder,
    whose adapter is where `msdiff train` wrote it."""
    root = Path(folder)

    def layout(adapter: str) -> dict[str, Path]:
        names = {
            "base": "base",
            "adapter": adapter,
            "image_encoder": "image_encoder",
            "evaluator": "evaluator.safetensors",
        }
        return {key: root / name for key, name in names.items()}

    def missing(parts: dict[str, Path]) -> str:
        return ", ".join(str(path.relative_to(root)) for path in parts.values() if not path.exists())

    exported, built = layout("adapter"), layout("adapter-train/adapter")
    for parts in (exported, built):
        if not missing(parts):
            return {key: str(path.resolve()) for key, path in parts.items()}
    raise FileNotFoundError(
        f"--models {root}: missing {missing(exported)}, as a folder laid out as the shipped weights (base/, adapter/, "
        "image_encoder/, evaluator.safetensors), which `msdiff world build --export-to FOLDER` writes; as a finished "
        f"`msdiff world build --out` folder, missing {missing(built)}."
    )


# What a `--models` option takes, in the command's and the world benchmarks' help.
MODELS_HELP = "a `msdiff world build --out` folder, or the folder its export wrote (default: the shipped models)"


def world_models(models: str | Path | None = None) -> dict[str, str]:
    """The world models a `--models` option names: that folder's (`world_models_folder`), or the
    shipped ones when it is not given."""
    return world_models_folder(models) if models else world_model_paths()


def world_pipeline(paths: dict[str, str] | None = None, device: str = "cpu", dtype: str = "fp32"):
    """`MSDiffusionXLPipeline` of the shipped world models, or of `paths` (`world_models_folder`)."""
    from ..loading import load_pipeline
    from ..settings import ModelSettings

    paths = paths or world_model_paths()
    models = ModelSettings(
        base=paths["base"], adapter=paths["adapter"], image_encoder=paths["image_encoder"], dtype=dtype
    )
    return load_pipeline(models, device=device)
