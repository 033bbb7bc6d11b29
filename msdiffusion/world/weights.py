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


def load_world_pipeline(device: str = "cpu", dtype=None):
    """`MSDiffusionXLPipeline` of the shipped world models (fp32 on the CPU by default)."""
    import torch

    from ..pipelines import MSDiffusionXLPipeline

    dtype = dtype or torch.float32
    paths = world_model_paths()
    pipe = MSDiffusionXLPipeline.from_pretrained(paths["base"], dtype=dtype)
    pipe.load_ms_adapter(paths["adapter"], image_encoder=paths["image_encoder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
