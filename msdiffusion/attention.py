"""Multi-subject cross-attention: each subject's image tokens act only inside its box (or its region mask).

Encoder hidden states are `[text tokens | dummy tokens | 16 tokens per subject]`. Every `attn2`
of the UNet gets an `MSAttnProcessor`: ordinary attention over the text, plus an image branch
whose keys/values come from `to_k_ip` / `to_v_ip` and whose visibility follows the layout.
ControlNets get `TextOnlyAttnProcessor`, which drops the image tokens.

Differences from a literal implementation of the released computation, all exact up to rounding:
- fused `scaled_dot_product_attention` for both branches; the -10000 bias is its float mask, in
  the query's dtype and laid out so that CUDA's fused kernels accept it (`layout.regions_to_bias`);
- zeroing the image probabilities of cells outside every box == zeroing those cells' output;
- multiplying subject j's probabilities by its scale == multiplying its value vectors by it;
- the negative (CFG) half has zero image tokens, hence zero image output: it is skipped;
- the image tokens are fixed during a generation: their keys/values are projected once;
- the global scale multiplies the 0/1 "inside a box" mask once per generation (one `addcmul`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from .layout import (
    SubjectLayout,
    auto_layout_regions,
    box_regions,
    latent_grid,
    phrase_weights,
    regions_to_bias,
    with_mask_regions,
)


class MSAttentionState:
    """What all processors of one UNet share during a generation (or a training step).

    Holds the active layout and everything derived from it once per activation, before the UNet
    runs: per-grid masks, per-token value scales, phrase averaging weights and (for generation)
    every layer's image keys/values. Inside the denoising loop a processor then only looks these
    up: no host-device synchronisation, no Python work that grows with the layers, and nothing
    that `torch.compile` has to guard on besides tensor shapes (a new layout, new boxes or new
    scales reuse the compiled UNet).
    """

    def __init__(self, levels: tuple[int, ...] | None = None) -> None:
        self.layout: SubjectLayout | None = None
        self.generation = 0
        self._generations = 0
        self.static_image_tokens = False
        # Whether encoder_hidden_states carry the image tokens after the text (else text only: the
        # processors take the keys/values projected on activation).
        self.tokens_in_hidden_states = True
        # UNet levels (number of 2x downsamplings of the latent) that have cross-attention; masks
        # for them are built on activation. None: every level down to 1x1.
        self.levels = levels
        self._cache: dict = {}
        # cells -> (h, w, bias (B,1,hw,T), inside*scale (B,1,hw,1), box regions (B,N,hw) if auto layout)
        self._masks: dict[int, tuple] = {}
        self._scale: torch.Tensor | None = None
        self._phrase_weights: torch.Tensor | None = None
        self._auto_layout: tuple[torch.Tensor, torch.Tensor] | None = None  # (mask_threshold, start_step)
        self.processors: list[MSAttnProcessor] = []

    @contextlib.contextmanager
    def activate(
        self,
        layout: SubjectLayout | None,
        static_image_tokens: bool = False,
        image_tokens: torch.Tensor | None = None,
        tokens_in_hidden_states: bool = True,
        num_text_tokens: int | None = None,
    ) -> Iterator["MSAttentionState"]:
        """Use `layout` for every UNet call inside the block.

        `static_image_tokens=True` promises the image tokens do not change inside the block (true
        for one generation), so each layer projects them once. `image_tokens` (B, T, C), the
        conditional rows' image tokens, goes further: every layer projects them here, before the
        UNet runs (what the pipeline does; it implies `static_image_tokens`). With them,
        `tokens_in_hidden_states=False` says the UNet is given the text embeddings alone, as
        bare SDXL is (what the pipeline does: no per-call slicing and copying of the text part).
        `num_text_tokens`, the text's length, lets auto layout make its phrase-averaging values here
        too, so that no UNet call, the first included, builds anything (one compiled graph for all steps).
        """
        if not tokens_in_hidden_states and image_tokens is None:
            raise ValueError(
                "tokens_in_hidden_states=False needs image_tokens: the processors take the subjects' keys/values from them."
            )
        processors = self.processors
        previous = (
            self.layout,
            self.static_image_tokens,
            self.tokens_in_hidden_states,
            self.generation,
            self._cache,
            self._masks,
            self._scale,
            self._phrase_weights,
            self._auto_layout,
            [p._static_kv for p in processors],
        )
        self.layout, self.static_image_tokens = layout, static_image_tokens or image_tokens is not None
        self.tokens_in_hidden_states = tokens_in_hidden_states
        self._generations += 1
        self.generation = self._generations  # never reused: per-layer caches are keyed by it
        self._cache, self._masks, self._scale, self._phrase_weights, self._auto_layout = {}, {}, None, None, None
        for p in processors:
            p._static_kv = None
            if layout is not None:
                p._maps = None  # a new running mean per generation (kept after the block: see auto_layout_maps)
        try:
            if layout is not None:
                self._prepare(layout, image_tokens, num_text_tokens)
            yield self
        finally:  # blocks nest: the outer layout (or none) is active again
            (
                self.layout,
                self.static_image_tokens,
                self.tokens_in_hidden_states,
                outer_generation,
                self._cache,
                self._masks,
                self._scale,
                self._phrase_weights,
                self._auto_layout,
                kvs,
            ) = previous
            for p, kv in zip(processors, kvs):
                p._static_kv = kv
            if self.layout is not None:
                self.generation = outer_generation

    def _prepare(self, layout: SubjectLayout, image_tokens: torch.Tensor | None, num_text_tokens: int | None) -> None:
        """Build, for the processors' device and dtype, what every layer call of this activation reads."""
        if not self.processors:
            return
        weight = self.processors[0].to_k_ip.weight
        h, w = layout.latent_size
        grids = {}
        for level in range(max(h, w).bit_length() + 1):
            grids[level] = (h, w)
            if self.levels is None or level in self.levels:
                self.image_masks(h * w, weight.device, weight.dtype, grid=(h, w))
            if h == w == 1:
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if layout.mask_threshold is not None:  # (B, P, N) over the text positions 0..P-1 that phrases use
            length = 1 + max((p for row in layout.phrase_positions for ps in row for p in ps), default=0)
            self._phrase_weights = phrase_weights(layout.phrase_positions, length, layout.num_subjects).to(
                weight.device
            )
            self.auto_layout_settings(weight.device)  # tensors: a compiled UNet does not specialise on them
            # Each layer's running mean of its phrase maps, made here and added to in place: the
            # denoising loop then runs one graph at every step, its first included, and under CUDA
            # graphs the sums stay where they are, as the masks and keys/values do.
            for p in self.processors:
                if p.level in grids:
                    gh, gw = grids[p.level]
                    total = torch.zeros(layout.batch_size, layout.num_subjects, gh * gw, device=weight.device)
                    p._maps = ((gh, gw), total, torch.zeros((), device=weight.device))
            if num_text_tokens is not None:  # one set of values per head shape, shared by the layers
                for heads, width in {
                    (p.heads, p.hidden_size // p.heads) for p in self.processors if p.heads is not None
                }:
                    self._phrase_values(layout.batch_size, heads, width, num_text_tokens, weight.device, weight.dtype)
        if image_tokens is None:
            return
        if image_tokens.shape[:2] != (layout.batch_size, layout.num_image_tokens):
            raise ValueError(
                f"image_tokens has shape {tuple(image_tokens.shape)}; the layout expects "
                f"({layout.batch_size}, {layout.num_image_tokens}, C): the conditional rows' image tokens only."
            )
        for p in self.processors:
            p._static_kv = p.project_image_tokens(image_tokens)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def num_text_tokens(self, encoder_hidden_states: torch.Tensor) -> int:
        """How many of `encoder_hidden_states`' tokens are text (the rest are the layout's image tokens)."""
        if not self.tokens_in_hidden_states:
            return encoder_hidden_states.shape[1]
        num_text = encoder_hidden_states.shape[1] - self.layout.num_image_tokens
        if num_text <= 0:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens but the layout expects "
                f"{self.layout.num_image_tokens} image tokens after the text: append the subject tokens to the prompt embeddings."
            )
        return num_text

    def grid(self, sequence_length: int) -> tuple[int, int]:
        return self._cached(("grid", sequence_length), lambda: latent_grid(self.layout.latent_size, sequence_length))

    def regions(self, h: int, w: int) -> torch.Tensor:
        """(B, N, hw) bool: each subject's cells on an `h x w` grid, from its box or, where it has one,
        its region mask; built once per grid size (on the CPU)."""
        layout = self.layout
        return self._cached(
            ("regions", h, w), lambda: with_mask_regions(box_regions(layout.boxes, h, w), layout.masks, h, w)
        )

    def box_masks(self, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias (B,1,hw,T), inside (B,hw,1)) from the boxes and region masks, built once per grid size."""
        layout = self.layout

        def build():
            regions = self.regions(h, w)
            bias, inside = regions_to_bias(regions, layout.tokens_per_subject, layout.num_dummy_tokens, dtype)
            return bias.to(device), inside.to(device)

        return self._cached(("box", h, w, device, dtype), build)

    def image_masks(self, cells: int, device, dtype, grid: tuple[int, int] | None = None) -> tuple:
        """(h, w, bias (B,1,hw,T), inside * scale (B,1,hw,1), regions (B,N,hw) or None) for a layer with
        `cells` query cells; the box (or mask) regions only with auto layout, which falls back to them.

        Built on activation for the processors' device and dtype; another device or dtype (model
        offloading, autocast) builds its own on first use.
        """
        entry = self._masks.get(cells)
        if entry is None or entry[2].device != device or entry[2].dtype != dtype:
            h, w = grid or self.grid(cells)
            bias, inside = self.box_masks(h, w, device, dtype)
            regions = None
            if self.layout.mask_threshold is not None:
                regions = self.regions(h, w).to(device)
            entry = (h, w, bias, (inside * self.image_scale(device, dtype))[:, None], regions)
            self._masks[cells] = entry
        return entry

    def image_scale(self, device, dtype) -> torch.Tensor:
        """The global image scale as a 0-d tensor (1 with per-subject scales, which act on the values):
        a tensor, so that a compiled UNet does not specialise on its value."""
        scale = self._scale
        if scale is None or scale.device != device or scale.dtype != dtype:
            layout = self.layout
            scale = torch.tensor(1.0 if layout.subject_scales is not None else layout.scale, device=device, dtype=dtype)
            self._scale = scale
        return scale

    def value_scales(self, device, dtype) -> torch.Tensor | None:
        """(B, T, 1) per-image-token factors for per-subject scales (dummy tokens: 1), or None."""
        layout = self.layout
        if layout.subject_scales is None:
            return None

        def build():
            per_token = layout.subject_scales.float().repeat_interleave(layout.tokens_per_subject, dim=1)
            dummy = per_token.new_ones(layout.batch_size, layout.num_dummy_tokens)
            return torch.cat([dummy, per_token], dim=1)[..., None].to(device, dtype)

        return self._cached(("scales", device, dtype), build)

    def auto_layout_settings(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask_threshold, start_step) as 0-d tensors (made on activation)."""
        settings = self._auto_layout
        if settings is None or settings[0].device != device:
            layout = self.layout
            settings = (
                torch.tensor(float(layout.mask_threshold), device=device),
                torch.tensor(float(layout.start_step), device=device),
            )
            self._auto_layout = settings
        return settings

    def phrase_weights(self, num_text_tokens: int, device) -> torch.Tensor:
        """(B, P, N) phrase averaging weights over the first P <= `num_text_tokens` text tokens."""
        weights = self._phrase_weights
        if weights is not None and weights.shape[1] <= num_text_tokens and weights.device == device:
            return weights
        layout = self.layout
        return self._cached(
            ("phrases", num_text_tokens, device),
            lambda: phrase_weights(layout.phrase_positions, num_text_tokens, layout.num_subjects).to(device),
        )

    def phrase_values(self, query: torch.Tensor, num_text: int) -> torch.Tensor:
        """(B, heads, T_text, W) attention values that average the text-attention probabilities over
        each subject's phrase positions (column j: 1/len at subject j's positions; zeros elsewhere).
        W is at least the head width, so that the call qualifies for the fused kernels (flash and
        cuDNN need equal head widths). Built on activation for each shape the layers will ask for
        (given the text length), else on first use; shared by the layers."""
        batch, heads, _, width = query.shape
        return self._phrase_values(batch, heads, width, num_text, query.device, query.dtype)

    def _phrase_values(self, batch: int, heads: int, width: int, num_text: int, device, dtype) -> torch.Tensor:
        def build():
            weights = self.phrase_weights(num_text, device)  # (B, P, N), P <= T_text
            _, positions, subjects = weights.shape
            values = torch.zeros(batch, 1, num_text, max(width, -(-subjects // 8) * 8), device=device, dtype=dtype)
            values[:, 0, :positions, :subjects] = weights.to(dtype)
            return values.expand(-1, heads, -1, -1).contiguous()

        return self._cached(("phrase_values", heads, num_text, width, device, dtype), build)

    def auto_layout_maps(self) -> torch.Tensor | None:
        """(B, N, h, w) auto-layout attention maps of the last generation, averaged over layers
        at the finest grid and min-max normalised; None if auto layout was off."""
        maps = [p.mean_map() for p in self.processors if p._maps is not None]
        if not maps:
            return None
        largest = max(maps, key=lambda m: m.shape[-1] * m.shape[-2])
        size = largest.shape[-2:]
        total = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps) / len(maps)
        low = total.amin(dim=(-2, -1), keepdim=True)
        high = total.amax(dim=(-2, -1), keepdim=True)
        return (total - low) / (high - low + 1e-5)


class MSAttnProcessor(nn.Module):
    """Cross-attention over text plus layout-masked subject tokens, for one UNet `attn2`."""

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        state: MSAttentionState,
        heads: int | None = None,
        level: int | None = None,
    ):
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.heads = heads  # the layer's; when known, keys/values made on activation are split into heads there
        self.level = level  # the layer's UNet level; when known, auto layout's running mean is allocated on activation
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.state = state  # shared by every processor of the UNet
        state.processors.append(self)
        self._kv_cache: tuple | None = None
        self._static_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # set by `state.activate(image_tokens=...)`
        self._maps: tuple | None = None  # (grid, running sum (B,N,hw), count (0-d tensor)) of the last generation

    def mean_map(self) -> torch.Tensor | None:
        """(B, N, h, w) mean of this layer's recorded phrase attention maps."""
        if self._maps is None:
            return None
        (h, w), total, count = self._maps
        return (total / count.clamp(min=1)).view(*total.shape[:2], h, w)  # zeros if the layer never ran

    def project_image_tokens(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) image tokens -> keys and values (B, T, hidden), values times the per-subject scales
        (split into (B, heads, T, head_dim) when the layer's head count is known)."""
        weight = self.to_k_ip.weight
        image_states = image_states.to(weight.device, weight.dtype)
        value = self.to_v_ip(image_states)
        scales = self.state.value_scales(value.device, value.dtype)
        if scales is not None:
            value = value * scales
        key = self.to_k_ip(image_states)
        if self.heads is not None:
            return _heads(key, self.heads), _heads(value, self.heads)
        return key, value

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state = self.state
        layout = state.layout
        if encoder_hidden_states is None or layout is None:
            return _text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, cells, _ = hidden_states.shape

        num_text = state.num_text_tokens(encoder_hidden_states)
        # a slice that drops tokens is not contiguous: to_k and to_v would copy it at every call
        text_states = (
            encoder_hidden_states if num_text == encoder_hidden_states.shape[1] else encoder_hidden_states[:, :num_text]
        )
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)

        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(text_states), attn.heads)
        value = _heads(attn.to_v(text_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])[..., :num_text]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        # Only the conditional rows carry image tokens; with CFG they are the second half.
        rows = layout.batch_size
        if batch == 2 * rows:
            cond = slice(rows, batch)
        elif batch == rows:
            cond = slice(0, batch)
        else:
            raise ValueError(
                f"UNet batch of {batch} does not match a layout of {rows} samples (or twice that with CFG)."
            )

        # Built on activation: a dictionary lookup here. `inside` is 0 outside every box, else the scale.
        h, w, bias, inside, given = state.image_masks(cells, query.device, query.dtype)
        if given is not None:  # auto layout (a compiled UNet would specialise on `layout.mask_threshold`)
            regions = self._record_and_auto_layout(attn, query[cond], key[cond], h, w, given)
            bias, inside = regions_to_bias(regions, layout.tokens_per_subject, layout.num_dummy_tokens, query.dtype)
            inside = (inside * state.image_scale(query.device, query.dtype))[:, None]

        kv = self._static_kv
        if kv is None:
            kv = self._image_key_value(encoder_hidden_states[cond, num_text:])
        key_ip, value_ip = kv
        if key_ip.ndim == 3:
            key_ip, value_ip = _heads(key_ip, attn.heads), _heads(value_ip, attn.heads)
        image_out = F.scaled_dot_product_attention(query[cond], key_ip, value_ip, attn_mask=bias)
        if cond.start == 0:
            out = torch.addcmul(out, image_out, inside)
        elif torch.is_grad_enabled():  # the attention's backward needs `out` unmodified
            out = torch.cat([out[:rows], torch.addcmul(out[rows:], image_out, inside)])
        else:  # inference: add into the conditional half in place, no copy of the batch
            out[cond].addcmul_(image_out, inside)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _image_key_value(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the image tokens when the state did not project them on activation."""
        state = self.state
        if state.static_image_tokens and self._kv_cache is not None and self._kv_cache[0] == state.generation:
            return self._kv_cache[1]
        result = self.project_image_tokens(image_states)
        self._kv_cache = (state.generation, result) if state.static_image_tokens else None
        return result

    def _record_and_auto_layout(self, attn, query, key, h: int, w: int, given: torch.Tensor) -> torch.Tensor:
        """Record this step's phrase attention maps and return the (B, N, hw) regions to use: the given
        ones (boxes, masks) until `start_step` maps are in, then the thresholded running mean of the maps.

        The step count is a tensor and the choice a `torch.where`, so a compiled UNet runs the same
        graph at every step (a Python counter would be a new constant, and a recompilation, per step).
        """
        state = self.state
        # One fused attention call with the phrase weights as values gives each head's maps: the
        # text-attention probabilities are never materialised.
        per_head = F.scaled_dot_product_attention(
            query, key, state.phrase_values(query, key.shape[-2]), scale=attn.scale
        )
        maps = per_head[..., : state.layout.num_subjects].float().mean(dim=1).transpose(1, 2)  # (B, N, hw)
        if self._maps is None or self._maps[1].shape != maps.shape:  # not made on activation (level unknown)
            self._maps = ((h, w), torch.zeros_like(maps), maps.new_zeros(()))
        _, total, count = self._maps
        total.add_(maps)
        count.add_(1)
        threshold, start_step = state.auto_layout_settings(maps.device)
        return torch.where(count >= start_step, auto_layout_regions(total / count, threshold), given)


class TextOnlyAttnProcessor:
    """For ControlNets fed the UNet's encoder hidden states: attend to the text tokens only."""

    def __init__(self, state: MSAttentionState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        layout = self.state.layout
        if encoder_hidden_states is not None and layout is not None:
            num_text = self.state.num_text_tokens(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states[:, :num_text]
            if attention_mask is not None:
                attention_mask = attention_mask[..., :num_text]
        return _text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


# diffusers' own SDPA processor is the plain path (no subjects active).
_text_attention = AttnProcessor2_0()
