"""Settings of the released MS-Diffusion code that the project's commands use by default.

Kept in one place (and free of heavy imports) so that `msdiff generate`, job files, training
validation and `msdiff bench` agree with each other and with the release.
"""

from __future__ import annotations

# `MSAdapter.generate()` of the release uses this whenever no negative prompt is given. The Python
# pipelines keep diffusers' convention instead (`negative_prompt=None`: SDXL zeroes the negative
# embeddings), so pass it explicitly there to match the release.
RELEASE_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"

# How several reference images of one subject become its 16 tokens: "concat" (the default) resamples
# all of their features together; "mean" resamples each image alone and averages. (The spec of the
# released computation does not cover several references; kept here, free of heavy imports, for the CLI.)
REFERENCE_COMBINE = ("concat", "mean")
