"""Training data: the JSON-lines manifest, the training dataset, and building manifests from captioned images.

Importing this package is cheap (the CLI imports it for `--help`); the classes load on first use.
"""

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"

_EXPORTS = {
    "ManifestError": "manifest",
    "Problem": "manifest",
    "Reference": "manifest",
    "Sample": "manifest",
    "SubjectRecord": "manifest",
    "read_manifest": "manifest",
    "validate_manifest": "manifest",
    "write_manifest": "manifest",
    "MSDiffusionDataset": "dataset",
    "collate_subjects": "dataset",
}

__all__ = ["DEFAULT_DETECTOR", "DEFAULT_SEGMENTER", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
