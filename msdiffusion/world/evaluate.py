"""An evaluator that knows the world: where each subject landed and whether it looks like its reference.

A small segmentation network, trained on the world's own labels (scenes passed through the
world's VAE, so that it sees the softness of generated images), tells for every pixel which class
of shape covers it. For a subject asked for in a box:

- **found**: a connected region of its class, or a connected shape (pixels of any class) most of
  whose pixels are of its class, has a bounding box with IoU >= 0.5 with the box (the second
  because the per-pixel map often splits one soft drawn shape between classes);
- **placed**: the same for a connected region of shapes of any class (the layout obeyed, whether or
  not the shape drawn is the right one);
- **iou**: that IoU (0 when no region of the class touches the box);
- **identity correct**: the colours and pattern of the region's pixels are closer to the
  subject's own identity than to every other subject's in the image and to a fixed set of
  training identities;
- **mixing**: the share of the region's pixels whose colour belongs to another subject of the
  image and not to this one (0 = clean, high = identities blended).

Identities are compared through a descriptor (`descriptor`): histograms of the pixels' nearest
palette colours over the region, its four halves and its outline, plus how often neighbouring
pixels change colour in each of four directions (which tells stripes of one angle from another,
checks from dots). Identities that render identically (`look_alikes`) are never rivals.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..boxes import box_iou
from .scenes import (
    CLASSES,
    COLORS,
    NUM_IDENTITIES,
    SIZE,
    draw_background,
    draw_subject,
    identity_parts,
    is_held_out,
    look_alikes,
    random_scene,
)

_PALETTE = np.array(list(COLORS.values()), np.float32)
MIN_REGION_PIXELS = 6
# Training identities every identity is compared against (fixed, so scores are comparable).
COMPARISON_IDENTITIES = tuple(
    int(i)
    for i in np.random.default_rng(1234).choice(
        [i for i in range(NUM_IDENTITIES) if not is_held_out(i)], 50, replace=False
    )
)


class Segmenter(nn.Module):
    """Per-pixel class logits (background + one per class) for 64x64 images; a small U-Net."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.enc1, self.enc2, self.enc3 = block(3, width), block(width, 2 * width), block(2 * width, 3 * width)
        self.dec2, self.dec1 = block(5 * width, 2 * width), block(3 * width, width)
        self.head = nn.Conv2d(width, 1 + len(CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        e3 = self.enc3(F.avg_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)


def _label_map(scene) -> np.ndarray:
    labels = np.zeros(scene.image.shape[:2], np.int64)
    for subject, mask in zip(scene.subjects, scene.masks):
        labels[mask] = 1 + CLASSES.index(subject.cls)
    return labels


def train_segmenter(vae, steps: int = 1500, batch: int = 32, seed: int = 0, log: Callable = print) -> Segmenter:
    """Train on fresh scenes of training identities (held-out ones stay unseen by every model, the
    evaluator's included), half of them passed through the VAE so that it also reads the softer
    images the diffusion model makes."""
    torch.manual_seed(seed)
    model = Segmenter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        scenes = [random_scene(np.random.default_rng([seed, 7, step, k])) for k in range(batch)]
        x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            half = batch // 2
            x[:half] = vae_round_trip(vae, x[:half])
        labels = torch.from_numpy(np.stack([_label_map(s) for s in scenes]))
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            log(f"segmenter step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def vae_round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] encoded and decoded (the posterior mean): what a model drawing through this VAE could show."""
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


def save_segmenter(model: Segmenter, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    from safetensors.torch import load_file

    model = Segmenter()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


# ---- regions and identity descriptors -----------------------------------------------------------------
def connected_regions(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, largest first (each a boolean mask)."""
    labels = np.zeros(mask.shape, np.int32)
    regions = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label = len(regions) + 1
        stack, pixels = [(y0, x0)], []
        labels[y0, x0] = label
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        regions.append(labels == label)
    return sorted(regions, key=lambda r: -int(r.sum()))


def _nearest_colors(pixels: np.ndarray) -> np.ndarray:
    return ((pixels[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1).argmin(1)


def _histogram(color: np.ndarray, where: np.ndarray) -> np.ndarray:
    hist = np.bincount(color[where], minlength=len(_PALETTE)).astype(np.float32)
    return hist / max(hist.sum(), 1)


# Pixel distances at which the texture part compares colours, along rows, columns and both diagonals:
# up to a stripe's or check's whole period, so 8 px stripes differ from 12 px ones and checks of 6 px
# from checks of 9 px (at distance d, a period-P pattern changes colour for about min(d, P - d) / (P / 2)).
_TEXTURE_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
_TEXTURE_DISTANCES = (1, 2, 3, 4, 6, 8)
# How far a pixel is from the nearest palette colour: gradients blend their two colours, halves do not.
_OFF_PALETTE_BINS = (0.0, 25.0, 60.0, np.inf)


def _changes(color: np.ndarray, where: np.ndarray, dy: int, dx: int) -> float:
    """Share of pixel pairs (both in `where`) at offset (dy, dx) whose palette colours differ."""
    h, w = color.shape
    ys, ye = max(0, -dy), h - max(0, dy)
    xs, xe = max(0, -dx), w - max(0, dx)
    a, b = color[ys:ye, xs:xe], color[ys + dy : ye + dy, xs + dx : xe + dx]
    both = where[ys:ye, xs:xe] & where[ys + dy : ye + dy, xs + dx : xe + dx]
    return float((a[both] != b[both]).mean()) if both.any() else 0.0


def descriptor(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Identity descriptor of the pixels under `mask`, 115 numbers: the palette histogram of the
    whole region (12), of its left, right, top and bottom halves (4 x 12: the direction of halves
    and gradients), of its outline pixels (12: a border pattern); how often neighbouring pixels
    change colour in four directions (4); the texture: how often pixels of the region's inside
    differ from those at 1 to 8 px in the same four directions (24: stripes' angle and period,
    checks' cell, dots); and how far its pixels are from the palette (3: a gradient's blend)."""
    color = np.full(mask.shape, -1)
    color[mask] = _nearest_colors(image[mask])
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    outline = mask & ~interior
    parts = [mask, mask & (xx < cx), mask & (xx > cx), mask & (yy < cy), mask & (yy > cy), outline]
    changes = [_changes(color, mask, dy, dx) for dy, dx in _TEXTURE_DIRECTIONS]
    texture = []
    for dy, dx in _TEXTURE_DIRECTIONS:
        for distance in _TEXTURE_DISTANCES:
            step = distance if not (dy and dx) else max(1, round(distance / math.sqrt(2)))  # diagonals: same length
            texture.append(_changes(color, interior, dy * step, dx * step))
    pixels = image[mask].astype(np.float32)
    far = np.sqrt(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1).min(1))
    off_palette = np.histogram(far, bins=_OFF_PALETTE_BINS)[0] / max(len(far), 1)
    return np.concatenate(
        [*[_histogram(color, part) for part in parts], np.array(changes + texture, np.float32), off_palette]
    ).astype(np.float32)


# Weights of the descriptor's parts in the distance: whole-region colours count most; the halves
# (4 histograms) together as much as the whole; the outline half as much; changes and texture one each.
_PART_WEIGHTS = np.concatenate(
    [np.full(12, 1.0), np.full(48, 0.25), np.full(12, 0.5), np.full(4 + 24, 1.0), np.full(3, 1.0)]
).astype(np.float32)


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b) * _PART_WEIGHTS).sum())


# A scene turns its subjects by up to 15 degrees; canonical renderings turned by these angles let a
# turned stripe or check be matched by its own pattern rather than by another angle's or period's.
CANONICAL_ANGLES = (-10.0, 0.0, 10.0)
_IDENTITY_CACHE: dict[tuple, np.ndarray] = {}


def identity_descriptor(identity: int, cls: str = "circle", size: float = 48.0, angle: float = 0.0) -> np.ndarray:
    """Descriptor of a canonical rendering of an identity: the class at `size` px, turned by
    `angle`, on grey (size matters for an outline's share of the pixels)."""
    key = (identity, cls, round(size / 4) * 4, angle)
    if key not in _IDENTITY_CACHE:
        side = int(key[2] * 1.5) + 4  # just the subject: the pattern's phase is the subject's own
        canvas = draw_background("plain", np.random.default_rng(0), size=side)
        mask = draw_subject(canvas, cls, identity, (side / 2, side / 2), float(key[2]), angle)
        _IDENTITY_CACHE[key] = descriptor(canvas.round().astype(np.uint8), mask)
    return _IDENTITY_CACHE[key]


# ---- evaluation --------------------------------------------------------------------------------------
@dataclass
class SubjectResult:
    cls: str
    identity: int
    box: tuple[float, float, float, float]
    found: bool
    iou: float
    identity_correct: bool  # colours and pattern (`judge_identity`)
    mixing: float
    found_box: tuple[float, float, float, float] | None
    # Some shape (of any class) fills the box: layout control, apart from whether the shape is right.
    placed: bool
    colours_correct: bool = False  # its two colours only: the pattern may be wrong

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AskedSubject:
    cls: str
    identity: int
    box: tuple[float, float, float, float]


class WorldEvaluator:
    """Scores generated world images against what was asked (classes, identities, boxes)."""

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WorldEvaluator":
        return cls(load_segmenter(path))

    @torch.no_grad()
    def class_maps(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) predicted label per pixel (0 background, 1 + class index) of (N, H, W, 3) uint8 images."""
        x = (
            torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        )  # a copy: PIL's arrays are read-only
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.segmenter(x).argmax(1).numpy()

    def evaluate(
        self, image: np.ndarray, asked: Sequence[AskedSubject], class_map: np.ndarray | None = None
    ) -> list[SubjectResult]:
        """Results for one image (H, W, 3 uint8) and the subjects it was asked to show."""
        if image.shape[:2] != (SIZE, SIZE):
            import PIL.Image

            image = np.asarray(PIL.Image.fromarray(image).resize((SIZE, SIZE), PIL.Image.BICUBIC))
        if class_map is None:
            class_map = self.class_maps(image[None])[0]
        from .scenes import mask_box

        def regions(mask: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
            return [(r, mask_box(r)) for r in connected_regions(mask) if r.sum() >= MIN_REGION_PIXELS]

        candidates = {c: regions(class_map == 1 + CLASSES.index(c)) for c in {s.cls for s in asked}}
        shapes = regions(class_map > 0)
        # Each whole shape also counts as the class most of its pixels have: touching shapes merge
        # into one region whose box fits neither, so the class's own regions stay candidates too.
        for region, box in shapes:
            majority = CLASSES[np.bincount(class_map[region] - 1, minlength=len(CLASSES)).argmax()]
            if majority in candidates:
                candidates[majority].append((region, box))
        results = []
        for k, subject in enumerate(asked):
            best, best_box, best_iou = None, None, 0.0
            for region, box in candidates[subject.cls]:
                iou = box_iou(box, subject.box)
                if iou > best_iou:
                    best, best_box, best_iou = region, box, iou
            colours, correct, mixing = False, False, 0.0
            if best is not None:
                others = [s.identity for j, s in enumerate(asked) if j != k and s.identity != subject.identity]
                colours, correct = judge_identity(image, best, subject, others)
                mixing = _mixing(image, best, subject.identity, others)
            results.append(
                SubjectResult(
                    subject.cls,
                    subject.identity,
                    tuple(subject.box),
                    bool(best_iou >= 0.5),
                    float(best_iou),
                    bool(correct),
                    mixing,
                    best_box,
                    any(box_iou(box, subject.box) >= 0.5 for _, box in shapes),
                    bool(colours),
                )
            )
        return results


def same_colours(identity: int) -> list[int]:
    """Every identity with the same two colours, in either order: all patterns, all orientations."""
    from .scenes import _PAIRS, COLOR_NAMES, PATTERNS

    a, b, _ = identity_parts(identity)
    pairs = [
        _PAIRS.index((COLOR_NAMES.index(a), COLOR_NAMES.index(b))),
        _PAIRS.index((COLOR_NAMES.index(b), COLOR_NAMES.index(a))),
    ]
    return [pair * len(PATTERNS) + k for pair in pairs for k in range(len(PATTERNS))]


def judge_identity(
    image: np.ndarray, region: np.ndarray, subject: AskedSubject, others: Sequence[int]
) -> tuple[bool, bool]:
    """(colours correct, identity correct) of the pixels of `region` for `subject`.

    Colours correct: the region's colours (its palette histogram alone) are nearer the subject's
    identity's than those of every rival of other colours (the other subjects and the fixed training
    identities). Identity correct: the whole descriptor is nearer the subject's identity than every
    rival's: those rivals, and every identity with the same two colours in either order (every
    other pattern and orientation, mirrored halves, reversed gradients), look-alikes excepted (no
    image tells those apart).
    """
    found = descriptor(image, region)
    # Canonical renderings in the asked class at the asked box's size (an outline's share of pixels).
    size = SIZE * max(subject.box[2] - subject.box[0], subject.box[3] - subject.box[1])

    def distance(identity: int, angles: Sequence[float] = CANONICAL_ANGLES) -> float:
        return min(descriptor_distance(found, identity_descriptor(identity, subject.cls, size, a)) for a in angles)

    def colour_distance(identity: int) -> float:
        return float(np.abs(found[:12] - identity_descriptor(identity, subject.cls, size)[:12]).sum())

    same = set(same_colours(subject.identity))
    twins = {subject.identity} | look_alikes(subject.identity)
    rivals = [i for i in dict.fromkeys([*others, *COMPARISON_IDENTITIES]) if i not in same]
    own_colours = colour_distance(subject.identity)
    colours = all(own_colours < colour_distance(i) for i in rivals)
    own = distance(subject.identity)
    # Other colours are told apart by the colour histograms: their upright rendering suffices.
    identity = all(own < distance(i, (0.0,)) for i in rivals) and all(own < distance(i) for i in same - twins)
    return colours, identity


def identity_is_correct(image: np.ndarray, region: np.ndarray, subject: AskedSubject, others: Sequence[int]) -> bool:
    """Whether `region` shows `subject`'s identity, pattern included (`judge_identity`)."""
    return judge_identity(image, region, subject, others)[1]


def _identity_colors(identity: int) -> set[int]:
    from .scenes import COLOR_NAMES, identity_parts

    a, b, _ = identity_parts(identity)
    return {COLOR_NAMES.index(a), COLOR_NAMES.index(b)}


def _mixing(image: np.ndarray, region: np.ndarray, identity: int, others: list[int]) -> float:
    colors = _nearest_colors(image[region])
    own = _identity_colors(identity)
    foreign = set().union(*[_identity_colors(i) for i in others]) - own if others else set()
    return float(np.isin(colors, list(foreign)).mean()) if foreign else 0.0


def _rates(group: list[SubjectResult]) -> dict:
    n = len(group)
    return {
        "subjects": n,
        "found": sum(r.found for r in group) / n if n else float("nan"),
        "placed": sum(r.placed for r in group) / n if n else float("nan"),
        "mean_iou": float(np.mean([r.iou for r in group])) if n else float("nan"),
        "identity_correct": sum(r.identity_correct for r in group) / n if n else float("nan"),
        "colours_correct": sum(r.colours_correct for r in group) / n if n else float("nan"),
        "found_and_correct": sum(r.found and r.identity_correct for r in group) / n if n else float("nan"),
        "mixing": float(np.mean([r.mixing for r in group])) if n else float("nan"),
    }


def summarize(results: list[list[SubjectResult]]) -> dict:
    """Rates over images, overall and by the number of subjects per image."""
    summary = {"all": _rates([r for image in results for r in image])}
    for count in sorted({len(image) for image in results}):
        summary[f"{count} subject{'s' if count != 1 else ''}"] = _rates(
            [r for image in results if len(image) == count for r in image]
        )
    return summary


def size_group(box: Sequence[float]) -> str:
    """A subject's size group: its box's longer side in px of the 64 px image, in bins of 6 px."""
    low = 6 * int(SIZE * max(box[2] - box[0], box[3] - box[1]) // 6)
    return f"{low:02d}-{low + 5:02d} px"  # zero-padded, so that the groups sort by size


BREAKDOWNS = {
    "pattern": lambda r: identity_parts(r.identity)[2][0],
    "class": lambda r: r.cls,
    "size": lambda r: size_group(r.box),
}


def breakdown(results: list[list[SubjectResult]], by: str) -> dict:
    """Rates over subjects grouped by their identity's pattern kind (`by="pattern"`), their class, or their
    box's size (`size_group`)."""
    if by not in BREAKDOWNS:
        raise ValueError(f"unknown breakdown {by!r}; choose one of {', '.join(BREAKDOWNS)}")
    key = BREAKDOWNS[by]
    subjects = [r for image in results for r in image]
    return {name: _rates([r for r in subjects if key(r) == name]) for name in sorted({key(r) for r in subjects})}


# What the world's model is asked to reach on held-out identities with default settings, over at
# least 200 generations (docs/world.md): (name, subject counts per image or None for all, rate, target).
TARGETS = (
    ("found, 1-2 subjects per image", (1, 2), "found", 0.90),
    ("found, 4 subjects per image", (4,), "found", 0.75),
    ("identity correct, all subjects", None, "identity_correct", 0.80),
)


def against_targets(results: list[list[SubjectResult]]) -> list[dict]:
    """Each of `TARGETS` with its measured rate, the number of subjects it rests on, and whether it is met."""
    rows = []
    for name, counts, rate, target in TARGETS:
        group = [r for image in results if counts is None or len(image) in counts for r in image]
        measured = _rates(group)[rate]
        rows.append(
            {
                "target": name,
                "measured": measured,
                "asked": target,
                "subjects": len(group),
                "met": bool(group) and measured >= target,
            }
        )
    return rows


def _with_pattern(identity: int, pattern: tuple, swap: bool = False) -> int:
    from .scenes import _PAIRS, COLOR_NAMES, PATTERNS

    a, b, _ = identity_parts(identity)
    a, b = (b, a) if swap else (a, b)
    return _PAIRS.index((COLOR_NAMES.index(a), COLOR_NAMES.index(b))) * len(PATTERNS) + PATTERNS.index(pattern)


def swapped(identity: int) -> int:
    """The identity with its two colours swapped (mirrored halves, a reversed and swapped gradient, ...)."""
    return _with_pattern(identity, identity_parts(identity)[2], swap=True)


def transposed(identity: int) -> int:
    """The identity whose rendering is this one's with x and y exchanged (stripes and gradients at
    90 degrees minus their angle, halves turned); checks, dots and borders are their own transpose."""
    kind, param = identity_parts(identity)[2]
    if kind == "stripes":
        return _with_pattern(identity, ("stripes", ((90 - param[0]) % 180, param[1])))
    if kind in ("gradient", "halves"):
        return _with_pattern(identity, (kind, (90 - param) % 360 if kind == "gradient" else 90 - param))
    return identity


def flipped(identity: int) -> int:
    """The identity whose rendering is this one's mirrored left to right."""
    kind, param = identity_parts(identity)[2]
    if kind == "stripes":
        return _with_pattern(identity, ("stripes", ((180 - param[0]) % 180, param[1])))
    if kind == "gradient":
        return _with_pattern(identity, ("gradient", (180 - param) % 360))
    if kind == "halves" and param == 0:  # left and right exchange their colours
        return swapped(identity)
    return identity


# Identities a drawing of another must not pass for: what a generator gets wrong when it takes the
# colours but not the pattern, or turns the reference. Only those that render differently count.
WRONG_IDENTITIES = {"swapped": swapped, "transposed": transposed, "flipped": flipped}


def wrong_identity(identity: int, how: str) -> int | None:
    """The identity a subject of `identity` renders as when `how` (a key of `WRONG_IDENTITIES`) happens
    to it, or None when it renders the same (its own pattern, or a look-alike of it)."""
    other = WRONG_IDENTITIES[how](identity)
    return None if other == identity or other in look_alikes(identity) else other


def ground_truth_check(
    evaluator: WorldEvaluator,
    count: int = 100,
    seed: int = 99,
    vae=None,
    wrong_class: bool = False,
    asked_as: str | None = None,
) -> dict:
    """The evaluator on real held-out scenes (what a perfect generator would score); with `vae`, on
    the scenes after its round trip (the best a generator drawing through that VAE could score).
    `wrong_class=True` asks for the next class of `CLASSES` in each subject's place: a generator
    drawing the wrong shapes in the right boxes, which should be found almost never. `asked_as`
    (a key of `WRONG_IDENTITIES`) asks for that other identity of each subject whose rendering
    differs: the identity judgement should accept almost none (subjects without one are skipped)."""
    results = []
    for i in range(count):
        scene = random_scene(np.random.default_rng([seed, i]), held_out=True)
        image = scene.image
        if vae is not None:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            image = ((vae_round_trip(vae, x)[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        asked = [
            AskedSubject(CLASSES[(CLASSES.index(s.cls) + wrong_class) % len(CLASSES)], s.identity, s.box)
            for s in scene.subjects
        ]
        if asked_as is None:
            results.append(evaluator.evaluate(image, asked))
            continue
        scored = []  # only the subjects whose other identity renders differently
        for k, s in enumerate(scene.subjects):
            other = wrong_identity(s.identity, asked_as)
            if other is not None:
                asked[k] = AskedSubject(s.cls, other, s.box)
                scored.append(k)
        if scored:
            found = evaluator.evaluate(image, asked)
            results.append([found[k] for k in scored])
    return summarize(results)
