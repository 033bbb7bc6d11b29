"""The procedural world: scenes of patterned shapes on backgrounds, where the truth is known.

A *subject* has a class (its shape, named by a word of the caption: "star", "ring", ...) and an
*identity* (two colours and a pattern) that only its reference image conveys. A scene is 1 to 4
subjects on a background, with a caption naming their classes and the background; boxes and
masks come for free. A subject's reference is another rendering of the same class and identity
(another size, rotation and background), as the paper takes references from other video frames.

Identities are numbered `0 .. NUM_IDENTITIES - 1`. About a tenth are held out of training, by
appearance: an identity and its look-alikes (`look_alikes`: renderings no image tells apart) are
held out together, so evaluation and the demo are zero-shot in what a model can see, not only in
the number.

Everything is numpy at a fixed size (`SIZE`); rendering one scene takes about a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SIZE = 64
# Every class differs from every other by more than the drawn edges' softness at 18 px (a hexagon,
# once a class, differed from a circle by a pixel or two, and every base drew it round).
CLASSES = ("star", "ring", "square", "heart", "triangle", "circle", "cross", "diamond", "moon", "hourglass")
# Subject colours: saturated and far apart, so that an identity is a clear fact of the image.
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 40),
    "green": (30, 170, 50),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 220),
    "purple": (140, 40, 200),
    "pink": (255, 120, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "brown": (130, 75, 30),
    "lime": (170, 255, 60),
}
COLOR_NAMES = tuple(COLORS)
# Patterns: (kind, parameter). Stripes: (angle in degrees, period in px); checks/dots: cell in px;
# gradient: direction in degrees; halves: split angle; border: outline width.
# Stripes, checks and dots are no finer than the VAE's 4 px latent cell: finer ones (periods of 4 and
# 6 px) do not survive the VAE's round trip.
PATTERNS = (
    *[("stripes", (a, p)) for a in (0, 45, 90, 135) for p in (8, 12)],
    ("checks", 6),
    ("checks", 9),
    ("dots", 8),
    ("dots", 11),
    *[("gradient", a) for a in (0, 90, 180, 270)],
    ("halves", 0),
    ("halves", 90),
    ("border", 2.5),
)
_PAIRS = [(a, b) for a in range(len(COLORS)) for b in range(len(COLORS)) if a != b]
NUM_IDENTITIES = len(_PAIRS) * len(PATTERNS)
# Backgrounds: caption words -> kind. Muted tones keep subjects readable.
# Side (px) of the square a subject is drawn in, by the number of subjects in its scene. Large enough
# that a subject spans 5 to 10 latent cells a side (under 16 px few subjects are drawn at all),
# small enough that four fit side by side.
SUBJECT_SIZES = {1: (26, 42), 2: (22, 34), 3: (20, 28), 4: (18, 26)}
BACKGROUNDS = {"a grid": "grid", "a gradient": "gradient", "sand": "speckle", "a plain wall": "plain"}
MAX_SUBJECTS = 4


def is_held_out(identity: int) -> bool:
    """Held-out identities: never in training data; evaluation and the demo use only these. A group of
    look-alikes is held out whole, when its smallest number is a multiple of 10 (251 identities)."""
    return min({identity} | look_alikes(identity)) % 10 == 0


def identity_parts(identity: int) -> tuple[str, str, tuple]:
    """(first colour, second colour, pattern) of an identity number."""
    if not 0 <= identity < NUM_IDENTITIES:
        raise ValueError(f"identity must be in [0, {NUM_IDENTITIES}), got {identity}")
    pair, pattern = divmod(identity, len(PATTERNS))
    a, b = _PAIRS[pair]
    return COLOR_NAMES[a], COLOR_NAMES[b], PATTERNS[pattern]


def look_alikes(identity: int) -> set[int]:
    """Identities rendered exactly like `identity` up to the pattern's phase: its colours swapped in
    stripes or checks, or swapped with the gradient reversed. No image can tell these apart, so the
    evaluator never counts one as another's rival."""
    a, b, (kind, param) = identity_parts(identity)
    if kind in ("stripes", "checks"):
        twin = (kind, param)
    elif kind == "gradient":
        twin = (kind, (param + 180) % 360)
    else:
        return set()
    return {_PAIRS.index((COLOR_NAMES.index(b), COLOR_NAMES.index(a))) * len(PATTERNS) + PATTERNS.index(twin)}


# Words for each pattern in the base's descriptive captions (`identity_words`). Stripes at angle 0
# vary along x, so they run vertically; a gradient at angle 0 goes from the first colour on the left
# to the second on the right.
_STRIPE_WORDS = {0: "vertical", 45: "diagonal", 90: "horizontal", 135: "slanted"}
_GRADIENT_WORDS = {0: "rightward", 90: "downward", 180: "leftward", 270: "upward"}


def _smallest(kind: str):
    """The smallest size parameter of a pattern kind (the stripes' period, the cell of checks or dots)."""
    return min(p[1] if kind == "stripes" else p for k, p in PATTERNS if k == kind)


def identity_words(identity: int) -> str:
    """An identity in words, as the base's captions describe it: 'red blue thin vertical striped'."""
    a, b, (kind, param) = identity_parts(identity)
    if kind == "stripes":
        angle, period = param
        pattern = f"{'thin' if period == _smallest(kind) else 'wide'} {_STRIPE_WORDS[angle]} striped"
    elif kind in ("checks", "dots"):
        pattern = f"{'small' if param == _smallest(kind) else 'large'} {'checked' if kind == 'checks' else 'dotted'}"
    elif kind == "gradient":
        pattern = f"{_GRADIENT_WORDS[param]} fading"
    elif kind == "halves":
        pattern = f"{'vertical' if param == 0 else 'horizontal'} halved"
    else:
        pattern = "bordered"
    return f"{a} {b} {pattern}"


IDENTITY_VOCABULARY = tuple(sorted({w for i in range(NUM_IDENTITIES) for w in identity_words(i).split()}))


@dataclass
class SceneSubject:
    cls: str
    identity: int


@dataclass
class PlacedSubject:
    cls: str
    identity: int
    box: tuple[float, float, float, float]  # tight box of the visible pixels, fractions of the image
    center: tuple[float, float]  # px
    size: float  # px, side of the square the shape is drawn in
    angle: float  # degrees


@dataclass
class Scene:
    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    caption: str
    background: str
    subjects: list[PlacedSubject] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # visible pixels of each subject, bool


# ---- shapes ----------------------------------------------------------------------------------------
def _polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float, phase: float) -> np.ndarray:
    """Inside a regular polygon (circumradius `radius`) in local coordinates."""
    angle = np.arctan2(v, u) - phase
    sector = 2 * math.pi / sides
    local = np.mod(angle, sector) - sector / 2
    apothem = radius * math.cos(sector / 2)
    return np.hypot(u, v) * np.cos(local) <= apothem


def shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside class `cls`, for local coordinates in [-1, 1] (v pointing down)."""
    r = np.hypot(u, v)
    if cls == "circle":
        return r <= 0.95
    if cls == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if cls == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if cls == "diamond":
        return abs(u) / 0.75 + abs(v) <= 0.98
    if cls == "triangle":
        return _polygon(u, v + 0.15, 3, 1.05, -math.pi / 2)
    if cls == "hourglass":
        return (abs(v) <= 0.9) & (abs(u) <= 0.15 + 0.8 * abs(v))
    if cls == "cross":
        return (np.maximum(abs(u), abs(v)) <= 0.95) & (np.minimum(abs(u), abs(v)) <= 0.3)
    if cls == "star":
        angle = np.arctan2(v, u) + math.pi / 2
        t = np.mod(angle, 2 * math.pi / 5) / (2 * math.pi / 5)  # 0..1 from one point to the next
        edge = 0.4 + 0.55 * np.abs(2 * t - 1) ** 1.6
        return r <= edge
    if cls == "heart":
        x, y = u * 1.25, -(v * 1.25 - 0.25)
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if cls == "moon":
        return (r <= 0.95) & (np.hypot(u - 0.45, v + 0.1) >= 0.75)
    raise ValueError(f"unknown class {cls!r}; classes are {', '.join(CLASSES)}")


def _pattern(identity: int, u: np.ndarray, v: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Colours (..., 3) of an identity: `u, v` local [-1, 1], `px, py` local pixels (pattern scale)."""
    a_name, b_name, (kind, param) = identity_parts(identity)
    a, b = np.array(COLORS[a_name], np.float32), np.array(COLORS[b_name], np.float32)
    if kind == "stripes":
        angle, period = param
        t = px * math.cos(math.radians(angle)) + py * math.sin(math.radians(angle))
        weight = (np.mod(t / period, 1.0) >= 0.5).astype(np.float32)
    elif kind == "checks":
        weight = ((np.floor(px / param) + np.floor(py / param)) % 2).astype(np.float32)
    elif kind == "dots":
        cx, cy = np.mod(px, param) - param / 2, np.mod(py, param) - param / 2
        weight = (np.hypot(cx, cy) <= param * 0.3).astype(np.float32)
    elif kind == "gradient":
        t = u * math.cos(math.radians(param)) + v * math.sin(math.radians(param))
        weight = np.clip((t + 1) / 2, 0, 1)
    elif kind == "halves":
        t = u * math.cos(math.radians(param)) + v * math.sin(math.radians(param))
        weight = (t > 0).astype(np.float32)
    elif kind == "border":
        weight = np.zeros_like(u)  # the outline is drawn by `draw_subject`
    else:  # pragma: no cover - PATTERNS is fixed
        raise ValueError(kind)
    return a + (b - a) * weight[..., None]


def draw_subject(
    canvas: np.ndarray, cls: str, identity: int, center: tuple[float, float], size: float, angle: float
) -> np.ndarray:
    """Draw a subject onto `canvas` (H, W, 3 float) in place (2x2 supersampled edges); returns its mask."""
    h, w = canvas.shape[:2]
    ss = 2
    ys, xs = np.mgrid[0 : h * ss, 0 : w * ss].astype(np.float32)
    xs, ys = (xs + 0.5) / ss - center[0], (ys + 0.5) / ss - center[1]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    lx, ly = cos * xs + sin * ys, -sin * xs + cos * ys  # pixels, in the subject's frame
    half = size / 2
    u, v = lx / half, ly / half
    inside = shape_mask(cls, u, v)
    colors = _pattern(identity, u, v, lx + 64, ly + 64)
    _, second, (kind, width) = identity_parts(identity)
    if kind == "border":
        shrunk = shape_mask(cls, u * half / max(half - width, 1), v * half / max(half - width, 1))
        colors[inside & ~shrunk] = np.array(COLORS[second], np.float32)
    coverage = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    color = (colors * inside[..., None]).reshape(h, ss, w, ss, 3).sum(axis=(1, 3)) / np.maximum(
        inside.reshape(h, ss, w, ss).sum(axis=(1, 3)), 1
    )[..., None]
    canvas[:] = canvas * (1 - coverage[..., None]) + color * coverage[..., None]
    return coverage >= 0.5


# ---- backgrounds -----------------------------------------------------------------------------------
def _muted(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(60, 190, size=3)
    gray = base.mean()
    return (gray + (base - gray) * 0.45).astype(np.float32)


def draw_background(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A (size, size, 3) float background of one kind."""
    c1 = _muted(rng)
    canvas = np.broadcast_to(c1, (size, size, 3)).copy()
    if kind == "grid":
        c2 = c1 + rng.choice([-45, 45])
        step = int(rng.integers(7, 11))
        ys, xs = np.mgrid[0:size, 0:size]
        line = ((xs + int(rng.integers(step))) % step == 0) | ((ys + int(rng.integers(step))) % step == 0)
        canvas[line] = c2
    elif kind == "gradient":
        c2 = _muted(rng)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        canvas = c1 * (1 - t) + c2 * t
        canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    elif kind == "speckle":
        canvas += rng.normal(0, 14, size=(size, size, 1)).astype(np.float32)
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(canvas, 0, 255)


# ---- scenes ----------------------------------------------------------------------------------------
def caption_for(classes: list[str], background: str, identities: list[int] | None = None) -> str:
    """'a star and a ring on a grid', 'a star, a ring and a moon on sand'; with `identities`, each
    class is described too: 'a red blue small dotted star and a ...' (the base's captions)."""
    names = (
        [f"a {c}" for c in classes]
        if identities is None
        else [f"a {identity_words(i)} {c}" for c, i in zip(classes, identities)]
    )
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {background}"


def _place(
    rng: np.random.Generator, n: int, taken: list[tuple[float, float, float]]
) -> tuple[float, float, float] | None:
    low, high = SUBJECT_SIZES[n]
    for attempt in range(60):
        # where a large subject finds no room, try smaller ones, down to the smallest of the range
        size = float(rng.uniform(low, high - (high - low) * attempt / 60))
        half = size / 2
        cx, cy = (float(rng.uniform(half, SIZE - half)) for _ in range(2))
        # boxes may touch or overlap a little, not hide each other
        if all(max(abs(cx - x), abs(cy - y)) >= (half + s / 2) * 0.85 for x, y, s in taken):
            return cx, cy, size
    return None


def render_scene(
    rng: np.random.Generator,
    subjects: list[SceneSubject],
    background: str | None = None,
    layout: list[tuple[float, float, float]] | None = None,
) -> Scene:
    """Draw `subjects` (random places unless `layout` gives (cx, cy, size) px) on a background."""
    background = background or str(rng.choice(list(BACKGROUNDS)))
    canvas = draw_background(BACKGROUNDS[background], rng)
    placed: list[PlacedSubject] = []
    masks: list[np.ndarray] = []
    taken: list[tuple[float, float, float]] = []
    for k, spec in enumerate(subjects):
        where = layout[k] if layout else _place(rng, len(subjects), taken)
        if where is None:
            break
        taken.append(where)
        angle = float(rng.uniform(-15, 15))
        mask = draw_subject(canvas, spec.cls, spec.identity, where[:2], where[2], angle)
        for earlier in masks:  # later subjects cover earlier ones
            earlier &= ~mask
        masks.append(mask)
        placed.append(PlacedSubject(spec.cls, spec.identity, (0, 0, 0, 0), where[:2], where[2], angle))
    for subject, mask in zip(placed, masks):
        subject.box = mask_box(mask)
    return Scene(
        canvas.round().astype(np.uint8), caption_for([s.cls for s in placed], background), background, placed, masks
    )


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a boolean mask as [x0, y0, x1, y1] fractions (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    h, w = mask.shape
    return (float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h))


def render_reference(rng: np.random.Generator, cls: str, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Another rendering of a subject: centred, large, another angle and background. (image, mask)."""
    canvas = draw_background(str(rng.choice(list(BACKGROUNDS.values()))), rng)
    size = float(rng.uniform(40, 54))
    center = (SIZE / 2 + float(rng.uniform(-3, 3)), SIZE / 2 + float(rng.uniform(-3, 3)))
    mask = draw_subject(canvas, cls, identity, center, size, float(rng.uniform(-15, 15)))
    return canvas.round().astype(np.uint8), mask


def random_subjects(rng: np.random.Generator, n: int, held_out: bool) -> list[SceneSubject]:
    """n subjects with distinct identities, from the held-out identities or the training ones."""
    identities: list[int] = []
    while len(identities) < n:
        identity = int(rng.integers(NUM_IDENTITIES))
        if is_held_out(identity) == held_out and identity not in identities:
            identities.append(identity)
    return [SceneSubject(str(rng.choice(CLASSES)), identity) for identity in identities]


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A training (or held-out) scene with 1 to 4 subjects."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
    return render_scene(rng, random_subjects(rng, n, held_out))
