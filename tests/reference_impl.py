"""A literal, slow implementation of the released computation (../shared/spec/released-model.md).

It re-derives everything from the spec with loops and materialised probabilities, independently
of the fast code in `msdiffusion.attention` / `msdiffusion.layout`, so that tests can check the
fast path against it: the same weights and inputs must give the same outputs up to rounding.
"""

from __future__ import annotations

import math

import torch

from msdiffusion.attention import MSAttnProcessor


def reference_grid(latent_size, cells):
    h, w = latent_size
    while h * w != cells:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def reference_box_cells(box, h, w):
    """Set of (row, col) a box covers: col in [floor(x0*w), ceil(x1*w)), row in [floor(y0*h), ceil(y1*h))."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        (r, c)
        for r in range(h)
        for c in range(w)
        if math.floor(x0 * w) <= c < math.ceil(x1 * w) and math.floor(y0 * h) <= r < math.ceil(y1 * h)
    }


class ReferenceMSProcessor(MSAttnProcessor):
    """Same weights and shared state as `MSAttnProcessor`, computed literally as the spec states."""

    def __init__(self, fast: MSAttnProcessor):
        super().__init__(fast.hidden_size, fast.cross_attention_dim, fast.state)
        self.load_state_dict(fast.state_dict())
        self.to(fast.to_k_ip.weight.device, fast.to_k_ip.weight.dtype)
        self.recorded: list[torch.Tensor] = []
        self.recorded_generation = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        layout = self.state.layout
        if layout is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.recorded_generation != self.state.generation:
            self.recorded, self.recorded_generation = [], self.state.generation
        batch, cells, _ = hidden_states.shape
        n_img = layout.num_image_tokens
        text, image = encoder_hidden_states[:, :-n_img], encoder_hidden_states[:, -n_img:]
        heads = attn.heads

        def split(x):
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        q = split(attn.to_q(hidden_states)).float()
        k, v = split(attn.to_k(text)).float(), split(attn.to_v(text)).float()
        scale = q.shape[-1] ** -0.5
        text_probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        text_out = text_probs @ v

        rows = layout.batch_size
        negative = batch - rows  # the CFG negative half comes first, with zero boxes
        h, w = reference_grid(layout.latent_size, cells)
        n, t = layout.num_subjects, layout.tokens_per_subject

        # Region of each subject, per sample.
        regions = torch.zeros(batch, n, cells, dtype=torch.bool)
        for b in range(negative, batch):
            for j in range(n):
                for r, c in reference_box_cells(layout.boxes[b - negative, j], h, w):
                    regions[b, j, r * w + c] = True
        if layout.mask_threshold is not None:
            maps = torch.zeros(batch, n, cells)
            for b in range(negative, batch):
                for j, positions in enumerate(layout.phrase_positions[b - negative]):
                    if positions:
                        maps[b, j] = text_probs[b][:, :, positions].mean(dim=-1).mean(dim=0).cpu()
            self.recorded.append(maps)
            if len(self.recorded) >= layout.start_step:
                mean = torch.stack(self.recorded).mean(dim=0)
                for b in range(negative, batch):
                    for j in range(n):
                        m = mean[b, j]
                        normed = (m - m.min()) / (m.max() - m.min() + 1e-5)
                        regions[b, j] = normed > layout.mask_threshold

        bias = torch.full((batch, cells, layout.num_image_tokens), -10000.0)
        for b in range(batch):
            for cell in range(cells):
                inside = regions[b, :, cell]
                if not inside.any():
                    bias[b, cell, : layout.num_dummy_tokens] = 0.0
                for j in range(n):
                    if inside[j]:
                        start = layout.num_dummy_tokens + j * t
                        bias[b, cell, start : start + t] = 0.0
        bias = bias.to(q.device)

        k_ip, v_ip = split(self.to_k_ip(image)).float(), split(self.to_v_ip(image)).float()
        probs = torch.softmax(q @ k_ip.transpose(-1, -2) * scale + bias[:, None], dim=-1)
        outside = ~regions.any(dim=1)  # (batch, cells)
        probs = probs.masked_fill(outside[:, None, :, None].to(q.device), 0.0)
        if layout.subject_scales is not None:
            factors = torch.ones(batch, layout.num_image_tokens)
            for b in range(negative, batch):
                for j in range(n):
                    start = layout.num_dummy_tokens + j * t
                    factors[b, start : start + t] = float(layout.subject_scales[b - negative, j])
            probs = probs * factors[:, None, None, :].to(q.device)
            global_scale = 1.0
        else:
            global_scale = layout.scale
        out = text_out + global_scale * (probs @ v_ip)
        out = out.transpose(1, 2).reshape(batch, cells, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def use_reference_processors(unet) -> None:
    """Swap every `MSAttnProcessor` of `unet` for its literal reference twin."""
    processors = {
        name: ReferenceMSProcessor(p) if isinstance(p, MSAttnProcessor) else p
        for name, p in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)
