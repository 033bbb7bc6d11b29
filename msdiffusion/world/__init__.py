"""A small procedural world where MS-Diffusion is trained and measured on a CPU (docs/world.md).

- `scenes`: patterned shapes (class named by the caption, identity shown only by the reference)
- `data`: the world's training set as an ordinary manifest
- `models`: SDXL-architecture models at a size that trains on 2 cores
- `base`: training the VAE, then the UNet with both text encoders
- `recipe`: every stage, resumable (`msdiff world build`)
- `evaluate`: found in box, IoU, identity correct, identity mixing (`msdiff world evaluate`)
- `weights`: the shipped models (`msdiff-world`, the default of `msdiff demo`)
"""
