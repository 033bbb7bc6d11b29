"""Settings of the released MS-Diffusion code that the project's commands use by default.

Kept in one place (and free of heavy imports) so that `msdiff generate`, job files, training
validation and `msdiff bench` agree with each other and with the release.
"""

from __future__ import annotations

# `MSAdapter.generate()` of the release uses this whenever no negative prompt is given. The Python
# pipelines keep diffusers' convention instead (`negative_prompt=None`: SDXL zeroes the negative
# embeddings), so pass it explicitly there to match the release.
RELEASE_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"

# How several reference images of one subject become its 16 tokens: the release resamples all of
# their features together ("concat", the default); "mean" resamples each image alone and averages.
REFERENCE_COMBINE = ("concat", "mean")
