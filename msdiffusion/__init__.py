"""MS-Diffusion: zero-shot, layout-guided, multi-subject personalization on SDXL."""

__version__ = "0.1.0"
