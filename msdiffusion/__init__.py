"""MS-Diffusion: zero-shot, layout-guided, multi-subject personalization on SDXL."""

__version__ = "0.1.0"

_EXPORTS = {
    "MSDiffusionXLPipeline": "pipelines",
    "MSDiffusionXLControlNetPipeline": "pipelines",
    "MSDiffusionXLImg2ImgPipeline": "pipelines",
    "MSDiffusionXLInpaintPipeline": "pipelines",
    "MSDiffusionXLControlNetImg2ImgPipeline": "pipelines",
    "MSDiffusionXLControlNetInpaintPipeline": "pipelines",
    "MSDiffusionPipelineOutput": "pipelines",
    "PreparedSubjects": "pipelines",
    "MSImageProjection": "adapter",
    "MSAdapterCheckpoint": "adapter",
    "AdapterMismatchError": "adapter",
    "load_checkpoint": "adapter",
    "GroundingResampler": "resampler",
    "ResamplerConfig": "resampler",
    "SubjectLayout": "layout",
    "GenerationSettings": "settings",
    "ModelSettings": "settings",
    "load_pipeline": "loading",
}


def __getattr__(name: str):
    # Lazy: `import msdiffusion` (and `msdiff --help`) must not pay for importing torch/diffusers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'msdiffusion' has no attribute {name!r}")


__all__ = list(_EXPORTS)
