"""The picture of docs/world.md's ablations: references, then one column per setting.

    python benchmarks/world_ablation_picture.py runs/ablations-id docs/images/world-ablation-two.png

RUNS is a `benchmarks/world_ablations.py --out` folder; green boxes: the boxes asked for, red: the
regions of the right class the evaluator found.
"""

import json
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw

root = sys.argv[1]
settings = ["full", "no_grounding", "scale_0.4", "whole_image_boxes", "no_boxes"]


def by_sample(path: str) -> dict:
    return {row["sample_id"]: row for row in map(json.loads, open(path).read().splitlines()) if row}


scores = {n: by_sample(f"{root}/{n}/scores.jsonl") for n in settings}
man = by_sample(f"{root}/full/manifest.jsonl")
S = 3 * 64
out_rows = []
for sid in ["two.000", "two.001", "two.002", "two.003", "three.000", "three.001"]:
    m = man[sid]
    refs = [
        PIL.Image.open(f"{root}/references/{s['reference']}").convert("RGB").resize((S, S), PIL.Image.NEAREST)
        for s in m["subjects"]
    ]
    while len(refs) < 3:
        refs.append(PIL.Image.new("RGB", (S, S), (255, 255, 255)))
    ims = list(refs)
    for n in settings:
        row = scores[n][sid]
        im = PIL.Image.open(f"{root}/{n}/{row['image']}").convert("RGB").resize((S, S), PIL.Image.NEAREST)
        d = PIL.ImageDraw.Draw(im)
        for s in row["subjects"]:
            d.rectangle([c * S for c in s["box"]], outline=(0, 255, 0), width=2)
            if s.get("detection"):
                d.rectangle([c * S for c in s["detection"]], outline=(255, 0, 0), width=1)
        ims.append(im)
    gap = np.full((S, 8, 3), 255, np.uint8)
    parts = [np.asarray(i) for i in ims]
    out_rows.append(np.concatenate(parts[:3] + [gap] + parts[3:], 1))
picture = PIL.Image.fromarray(np.concatenate(out_rows, 0))
picture = picture.resize((picture.width * 2 // 3, picture.height * 2 // 3), PIL.Image.LANCZOS)
picture.quantize(colors=256, method=PIL.Image.Quantize.MEDIANCUT).save(
    sys.argv[2], optimize=True
)  # a small PNG for the docs
