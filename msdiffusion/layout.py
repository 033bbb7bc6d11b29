"""Layout: boxes and region masks -> per-layer cell masks, phrases -> token positions, attention maps -> auto layout.

Everything here is plain tensor maths on one generation's inputs; the attention processors call it
once per generation and grid size (see `attention.MSAttentionState`), never per layer call.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch

# Additive bias that hides an image token from a cell (released value; exp(-10000) is exactly 0).
MASK_BIAS = -10000.0
# Added to the max-min range when normalising auto-layout maps.
NORM_EPS = 1e-5
# How subject phrases are found in the prompt (auto layout's attention maps): "tokens" matches the
# phrase's tokens, the k-th subject of a phrase at its k-th occurrence; "release" reproduces the
# released code's word matching, repeated-phrase quirk included (see `release_phrase_token_positions`).
PHRASE_MATCHING = ("tokens", "release")
# Row stride (elements) of the attention bias: CUDA's memory-efficient SDPA kernel needs every
# stride but the last to be a multiple of 8 elements (16 covers every dtype and cuDNN's 16 bytes).
BIAS_ALIGNMENT = 16


@dataclass
class SubjectLayout:
    """The subjects of one UNet batch, as the multi-subject cross-attention needs them.

    Rows are the conditional samples of the batch (the classifier-free-guidance negative half, if
    any, is not described: its image tokens are zeros and contribute nothing).
    """

    boxes: torch.Tensor  # (B, N, 4) in [0, 1]; all-zero rows are "no box" (and padding)
    latent_size: tuple[int, int]  # (H, W) of the UNet input
    scale: float = 0.6
    subject_scales: torch.Tensor | None = None  # (B, N); replaces `scale` when given
    phrase_positions: list[list[list[int]]] | None = None  # [b][j] -> token positions in the text
    mask_threshold: float | None = None  # auto layout on when set
    start_step: int = 5
    tokens_per_subject: int = 16
    num_dummy_tokens: int = 4
    # [b][j] -> an (H, W) bool region mask of any size that replaces box j's region, or None (the box's).
    # Rows may be shorter than N (padding slots have no mask); None: boxes only.
    masks: list[list[torch.Tensor | None]] | None = None

    def __post_init__(self) -> None:
        if self.boxes.ndim != 3 or self.boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (batch, subjects, 4), got {tuple(self.boxes.shape)}")
        if self.masks is not None:
            if len(self.masks) != self.boxes.shape[0] or any(len(row) > self.boxes.shape[1] for row in self.masks):
                raise ValueError(
                    f"masks must hold one row of at most {self.boxes.shape[1]} entries per sample "
                    f"({self.boxes.shape[0]} samples), got {[len(row) for row in self.masks]}"
                )
            for row in self.masks:
                for mask in row:
                    if mask is not None and (mask.ndim != 2 or mask.dtype != torch.bool):
                        raise ValueError(
                            f"each mask must be an (H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
                        )
        if self.subject_scales is not None and self.subject_scales.shape != self.boxes.shape[:2]:
            raise ValueError(
                f"subject_scales must have shape {tuple(self.boxes.shape[:2])}, got {tuple(self.subject_scales.shape)}"
            )
        if self.mask_threshold is not None and self.phrase_positions is None:
            raise ValueError("auto layout (mask_threshold) needs the phrases' token positions")

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_subjects(self) -> int:
        return self.boxes.shape[1]

    @property
    def num_image_tokens(self) -> int:
        return self.num_dummy_tokens + self.num_subjects * self.tokens_per_subject

    def repeat_interleave(self, repeats: int) -> "SubjectLayout":
        """The layout of a batch where every row is repeated `repeats` times in a row."""
        if repeats == 1:
            return self
        positions = None
        if self.phrase_positions is not None:
            positions = [row for row in self.phrase_positions for _ in range(repeats)]
        scales = None if self.subject_scales is None else self.subject_scales.repeat_interleave(repeats, 0)
        masks = None if self.masks is None else [row for row in self.masks for _ in range(repeats)]
        return SubjectLayout(
            boxes=self.boxes.repeat_interleave(repeats, 0),
            latent_size=self.latent_size,
            scale=self.scale,
            subject_scales=scales,
            phrase_positions=positions,
            mask_threshold=self.mask_threshold,
            start_step=self.start_step,
            tokens_per_subject=self.tokens_per_subject,
            num_dummy_tokens=self.num_dummy_tokens,
            masks=masks,
        )


def latent_grid(latent_size: tuple[int, int], sequence_length: int) -> tuple[int, int]:
    """The `h x w` grid of a UNet level whose flattened length is `sequence_length`.

    SDXL's stride-2 convolutions (kernel 3, padding 1) give `ceil(n / 2)` per level.
    """
    h, w = latent_size
    while h * w > sequence_length and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != sequence_length:
        raise ValueError(
            f"No UNet level of a {latent_size[0]}x{latent_size[1]} latent has {sequence_length} cells; "
            "the layout was made for another image size."
        )
    return h, w


def box_regions(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, 4) boxes -> (B, N, h*w) bool: the cells each box covers on an `h x w` grid.

    A box covers columns `[floor(x0*w), ceil(x1*w))` and rows `[floor(y0*h), ceil(y1*h))`, computed
    in float64 like Python floats; an all-zero box covers nothing.
    """
    boxes = boxes.detach().to("cpu", torch.float64)
    x0 = torch.floor(boxes[..., 0] * w)[..., None]
    y0 = torch.floor(boxes[..., 1] * h)[..., None]
    x1 = torch.ceil(boxes[..., 2] * w)[..., None]
    y1 = torch.ceil(boxes[..., 3] * h)[..., None]
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)


def mask_regions(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H, W) bool region mask of any size -> (h*w,) bool: the cells of an `h x w` grid its pixels touch.

    The mask is stretched over the image like a box's fractions: pixel (r, c) spans the fractions
    `[c/W, (c+1)/W) x [r/H, (r+1)/H)` and covers the cells `box_regions` gives that little box, in
    the same float64 arithmetic. A rectangle of pixels thus covers exactly the cells of its box
    `[c0/W, r0/H, c1/W, r1/H]`, and any shape covers the union of its pixels' cells.
    """
    mask = mask.detach().to("cpu", torch.bool)
    rows = _pixel_cells(mask.shape[0], h).to(torch.float32)  # (H, h)
    cols = _pixel_cells(mask.shape[1], w).to(torch.float32)  # (W, w)
    # "Any pixel of the cell" as two products of counts: exact in float32 (a count is at most H or W).
    per_row_cell = (rows.T @ mask.to(torch.float32)) > 0  # (h, W)
    return ((per_row_cell.to(torch.float32) @ cols) > 0).reshape(-1)


def _pixel_cells(pixels: int, cells: int) -> torch.Tensor:
    """(pixels, cells) bool: pixel p of a `pixels`-long side covers cells `[floor(p/n*cells), ceil((p+1)/n*cells))`."""
    edges = torch.arange(pixels + 1, dtype=torch.float64) / pixels
    low = torch.floor(edges[:-1] * cells)[:, None]
    high = torch.ceil(edges[1:] * cells)[:, None]
    index = torch.arange(cells, dtype=torch.float64)
    return (index >= low) & (index < high)


def with_mask_regions(
    regions: torch.Tensor, masks: list[list[torch.Tensor | None]] | None, h: int, w: int
) -> torch.Tensor:
    """(B, N, h*w) box regions with each masked subject's region replaced by its mask's cells."""
    if masks is None or all(mask is None for row in masks for mask in row):
        return regions
    regions = regions.clone()
    done: dict[int, torch.Tensor] = {}  # rows repeated for several images per prompt share their masks
    for b, row in enumerate(masks):
        for j, mask in enumerate(row):
            if mask is not None:
                if id(mask) not in done:
                    done[id(mask)] = mask_regions(mask, h, w).to(regions.device)
                regions[b, j] = done[id(mask)]
    return regions


def regions_to_bias(
    regions: torch.Tensor, tokens_per_subject: int, num_dummy_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject regions (B, N, hw) -> attention bias (B, 1, hw, T) over the image tokens and the
    (B, hw, 1) mask of cells that receive any image contribution.

    Subject j's tokens are visible only inside its region; the dummy tokens only outside every
    region, where the image branch is then zeroed.

    The bias is laid out for CUDA's fused attention kernels: its last dimension has stride 1 (a
    transposed mask sends `scaled_dot_product_attention` to its unfused math path) and its rows
    start every `BIAS_ALIGNMENT` elements (else the memory-efficient kernel pads a copy of the
    mask at every call); the padding columns are never read.
    """
    batch, _, cells = regions.shape
    inside = regions.any(dim=1)  # (B, hw)
    dummy = (~inside)[..., None].expand(-1, -1, num_dummy_tokens)
    visible = torch.cat([dummy, regions.transpose(1, 2).repeat_interleave(tokens_per_subject, dim=2)], dim=2)
    tokens = visible.shape[-1]
    row = -(-tokens // BIAS_ALIGNMENT) * BIAS_ALIGNMENT
    bias = torch.full((batch, 1, cells, row), MASK_BIAS, dtype=dtype, device=regions.device)[..., :tokens]
    bias.masked_fill_(visible[:, None], 0.0)
    return bias, inside[..., None].to(dtype)


def auto_layout_regions(mean_maps: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(B, N, hw) averaged attention maps -> (B, N, hw) bool regions: min-max normalise each map, threshold."""
    low = mean_maps.amin(dim=-1, keepdim=True)
    high = mean_maps.amax(dim=-1, keepdim=True)
    return (mean_maps - low) / (high - low + NORM_EPS) > threshold


def phrase_token_positions(tokenizer, prompt: str, phrases: list[str], matching: str = "tokens") -> list[list[int]]:
    """Token positions of each phrase in the tokenized prompt (position 0 is the start token).

    Matching uses the tokenizer's own tokens, so case and punctuation are handled as the text
    encoder sees them. The k-th subject with a given phrase maps to the k-th occurrence of it.
    An empty list means "not found". `matching="release"` gives the released code's positions
    instead (`release_phrase_token_positions`).
    """
    if matching == "release":
        return release_phrase_token_positions(tokenizer, prompt, phrases)
    if matching != "tokens":
        raise ValueError(f"phrase_matching must be one of {', '.join(PHRASE_MATCHING)}, got {matching!r}.")
    max_length = getattr(tokenizer, "model_max_length", 77)
    prompt_ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
    occurrences_used: dict[tuple[int, ...], int] = {}
    positions = []
    for phrase in phrases:
        ids = tuple(tokenizer(phrase, add_special_tokens=False).input_ids)
        starts = _occurrences(prompt_ids, ids)
        k = occurrences_used.get(ids, 0)
        occurrences_used[ids] = k + 1
        positions.append(list(range(starts[k], starts[k] + len(ids))) if k < len(starts) and ids else [])
    return positions


def release_phrase_token_positions(tokenizer, prompt: str, phrases: list[str]) -> list[list[int]]:
    """The phrase positions the released inference code computes, for reproducing its images exactly.

    It works on whitespace-separated words: a prompt word matches a phrase word when they are equal
    once one trailing `.!?,:` is dropped from the prompt word (case-sensitive), or when the prompt
    word contains `-word` ("hot-dog" matches "dog"); positions are counted by tokenizing each word on
    its own. The k-th subject of a phrase (counted by its exact text) skips k earlier matches, but
    the release skips them without counting their tokens, so every repeated phrase after the first
    lands earlier than its real place ("a cat, a cat, and a cat": [[2], [3], [5]] where the tokens
    are at [[2], [5], [9]]). That only changes auto-layout maps; `phrase_token_positions` with its
    default matching is the intended behaviour.
    """
    used: dict[str, int] = {}
    positions = []
    for phrase in phrases:
        skip = used.get(phrase, 0)
        used[phrase] = skip + 1
        positions.append(_release_positions(tokenizer, phrase, prompt.split(), skip))
    return positions


def _release_positions(tokenizer, phrase: str, words: list[str], skip: int) -> list[int]:
    wanted = phrase.split()
    if not wanted:
        return []
    position = 1  # after the start token
    for i in range(len(words)):
        window = words[i : i + len(wanted)]
        if len(window) == len(wanted) and all(_release_word_match(w, p) for w, p in zip(window, wanted)):
            if skip:
                skip -= 1
                continue  # as released: the skipped occurrence's tokens are not counted
            counted = window[:-1] + [_strip_end_punctuation(window[-1])]
            length = sum(_word_token_count(tokenizer, w) for w in counted)
            return list(range(position, position + length))
        position += _word_token_count(tokenizer, words[i])
    return []


def _strip_end_punctuation(word: str) -> str:
    return re.sub(r"[.!?,:]$", "", word)


def _release_word_match(prompt_word: str, phrase_word: str) -> bool:
    return f"-{phrase_word}" in prompt_word or phrase_word == _strip_end_punctuation(prompt_word)


def _word_token_count(tokenizer, word: str) -> int:
    return len(tokenizer(word, add_special_tokens=False).input_ids)


def _occurrences(sequence: list[int], pattern: tuple[int, ...]) -> list[int]:
    """Start indices of non-overlapping occurrences of `pattern` in `sequence`."""
    starts, i, n = [], 0, len(pattern)
    while n and i + n <= len(sequence):
        if tuple(sequence[i : i + n]) == pattern:
            starts.append(i)
            i += n
        else:
            i += 1
    return starts


def phrase_weights(phrase_positions: list[list[list[int]]], num_text_tokens: int, num_subjects: int) -> torch.Tensor:
    """(B, T_text, N) averaging weights: column j holds 1/len at subject j's phrase positions."""
    weights = torch.zeros(len(phrase_positions), num_text_tokens, num_subjects)
    for b, row in enumerate(phrase_positions):
        for j, positions in enumerate(row):
            positions = [p for p in positions if p < num_text_tokens]
            if positions:
                weights[b, positions, j] = 1.0 / len(positions)
    return weights


def phrases_past_token_limit(tokenizer, prompt: str, phrases: list[str], positions: list[list[int]]) -> list[bool]:
    """For each phrase not found in the (truncated) prompt: whether it is there, but past the token limit."""
    prompt_ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # no "longer than 77" warning
    occurrences_used: dict[tuple[int, ...], int] = {}
    past = []
    for phrase, found in zip(phrases, positions):
        ids = tuple(tokenizer(phrase, add_special_tokens=False).input_ids)
        k = occurrences_used.get(ids, 0)
        occurrences_used[ids] = k + 1
        past.append(not found and bool(ids) and k < len(_occurrences(prompt_ids, ids)))
    return past


def warn_missing_phrases(
    prompt: str, phrases: list[str], positions: list[list[int]], auto_layout: bool, tokenizer=None
) -> None:
    """Warn about each phrase that cannot be located in the prompt; with `tokenizer`, say when it was cut off."""
    past = (
        phrases_past_token_limit(tokenizer, prompt, phrases, positions)
        if tokenizer is not None
        else [False] * len(phrases)
    )
    for phrase, found, cut_off in zip(phrases, positions, past):
        if found:
            continue
        consequence = (
            "auto layout cannot guide this subject (it gets no region once auto layout starts)"
            if auto_layout
            else "its phrase embedding is still used, but it cannot be located in the text"
        )
        if cut_off:
            limit = getattr(tokenizer, "model_max_length", 77)
            message = (
                f"Subject phrase {phrase!r} lies past the {limit}th token of the prompt, where SDXL's text encoders "
                f"stop reading: {consequence}. Move it earlier or shorten the prompt."
            )
        else:
            message = (
                f"Subject phrase {phrase!r} was not found in the prompt {prompt!r} (or not as often as it is "
                f"given): {consequence}. Use the exact words of the prompt as the phrase."
            )
        warnings.warn(message, stacklevel=3)
