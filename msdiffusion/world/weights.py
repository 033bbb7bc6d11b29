"""The world's trained models, shipped inside the package (fp16 safetensors, a few MB).

`WORLD` is the model id that jobs, `msdiff demo`, `msdiff generate` and `msdiff ui` accept for
base, adapter and image encoder together: it names these folders, wherever the package is.
"""

from __future__ import annotations

from pathlib import Path

WORLD = "msdiff-world"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PARTS = {"base": "base", "adapter": "adapter", "image_encoder": "image_encoder"}


def world_model_paths() -> dict[str, str]:
    """{base, adapter, image_encoder, evaluator} folders / files of the shipped world models."""
    missing = [name for name in (*PARTS.values(), "evaluator.safetensors") if not (WEIGHTS_DIR / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"The world's weights are not in {WEIGHTS_DIR} (missing: {', '.join(missing)}). They ship with the "
            "package; in a source checkout rebuild them with `msdiff world build --out runs/world` (docs/world.md)."
        )
    paths = {key: str(WEIGHTS_DIR / name) for key, name in PARTS.items()}
    paths["evaluator"] = str(WEIGHTS_DIR / "evaluator.safetensors")
    return paths


def world_models_folder(folder: str | Path) -> dict[str, str]:
    """{base, adapter, image_encoder, evaluator} of another folder of world models: laid out as the
    shipped weights (what `msdiff world build --export-to` writes), or a finished `--out` folder,
    whose adapter is where `msdiff train` wrote it."""
    root = Path(folder)

    def layout(adapter: str) -> dict[str, Path]:
        names = {"base": "base", "adapter": adapter, "image_encoder": "image_encoder", "evaluator": "evaluator.safetensors"}
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


def load_world_pipeline(device: str = "cpu", dtype=None, paths: dict[str, str] | None = None):
    """`MSDiffusionXLPipeline` of the shipped world models, or of `paths` (`world_models_folder`); fp32
    on the CPU by default."""
    import torch

    from ..pipelines import MSDiffusionXLPipeline

    dtype = dtype or torch.float32
    paths = paths or world_model_paths()
    pipe = MSDiffusionXLPipeline.from_pretrained(paths["base"], dtype=dtype)
    pipe.load_ms_adapter(paths["adapter"], image_encoder=paths["image_encoder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
