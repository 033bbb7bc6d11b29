"""Grounding resampler: CLIP features of a subject, plus its phrase and box, become its image tokens.

Parameter names follow the released checkpoint (`image_proj.*` of `ms_adapter.bin`) exactly, so
its state dict loads as is; see `../shared/spec/released-model.md`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


def box_fourier_embedding(boxes: torch.Tensor, num_freqs: int = 8) -> torch.Tensor:
    """Fourier features of `[x0, y0, x1, y1]` boxes: (..., 4) -> (..., 8 * num_freqs).

    Frequency k is `100 ** (k / num_freqs)`; for each k the four sines then the four cosines,
    concatenated over k in order (index `k*8 + (0 sin | 1 cos)*4 + coordinate`).
    """
    freqs = 100 ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    angles = freqs[:, None] * boxes.float()[..., None, :]  # (..., k, 4)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(boxes.dtype)


class PerceiverAttention(nn.Module):
    """Latents attend over `[image features ; latents]` (Perceiver / IP-Adapter Plus style)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n_latents, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        # Scaling q and k separately (rather than the product) is what the weights were trained with.
        scale = self.dim_head**-0.25
        scores = (q * scale) @ (k * scale).transpose(-2, -1)
        if x_mask is not None:  # padding of subjects given several references: latents always visible
            keep = torch.cat([x_mask, x_mask.new_ones(b, n_latents)], dim=1)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n_latents, -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16
    embedding_dim: int = 1664  # image encoder hidden size
    output_dim: int = 2048  # UNet cross-attention dim
    ff_mult: int = 4
    phrase_dim: int = 768  # first text encoder hidden size
    num_freqs: int = 8
    grounding_hidden_dim: int = 1664  # released rule: released_grounding_hidden_dim(phrase_dim, num_freqs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], dim_head: int = 64, num_freqs: int = 8
    ) -> "ResamplerConfig":
        """Infer the architecture from tensor shapes (the released `.bin` carries no config)."""
        dim, embedding_dim = state["proj_in.weight"].shape
        grounding_hidden_dim, grounding_in = state["latent_proj.0.weight"].shape
        depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("layers."))
        return cls(
            dim=dim,
            depth=depth,
            dim_head=dim_head,
            heads=state["layers.0.0.to_q.weight"].shape[0] // dim_head,
            num_queries=state["grounding_latents"].shape[1],
            embedding_dim=embedding_dim,
            output_dim=state["proj_out.weight"].shape[0],
            ff_mult=state["layers.0.1.1.weight"].shape[0] // dim,
            phrase_dim=grounding_in - 8 * num_freqs,
            num_freqs=num_freqs,
            grounding_hidden_dim=grounding_hidden_dim,
        )


def released_grounding_hidden_dim(phrase_dim: int, num_freqs: int = 8) -> int:
    """Hidden width of `latent_proj` in the release: twice its input (phrase embedding + box features).

    For SDXL's 768-d phrases that is 2 * (768 + 64) = 1664, which happens to equal ViT-bigG's width;
    with another image encoder the two differ, and only this rule gives adapters the released code loads.
    """
    return 2 * (phrase_dim + 8 * num_freqs)


class GroundingResampler(nn.Module):
    """Turns each subject's CLIP features (+ phrase embedding + box) into `num_queries` tokens."""

    def __init__(self, config: ResamplerConfig = ResamplerConfig()):
        super().__init__()
        c = self.config = config
        self.grounding_latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.latent_proj = nn.Sequential(
            nn.Linear(c.phrase_dim + 8 * c.num_freqs, c.grounding_hidden_dim),
            nn.GELU(),
            nn.Linear(c.grounding_hidden_dim, c.num_queries * c.dim),
        )
        self.latent_norm = nn.LayerNorm(c.dim)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        self.attention_norm = nn.LayerNorm(c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    def grounding_queries(
        self, phrase_embeds: torch.Tensor, boxes: torch.Tensor, drop_grounding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Initial latents of each subject: (S, 768) phrases and (S, 4) boxes -> (S, num_queries, dim)."""
        c = self.config
        grounding = torch.cat([phrase_embeds, box_fourier_embedding(boxes, c.num_freqs)], dim=-1)
        latents = self.latent_norm(self.latent_proj(grounding).view(-1, c.num_queries, c.dim))
        if drop_grounding is not None:
            learned = self.grounding_latents.to(latents.dtype).expand_as(latents)
            latents = torch.where(drop_grounding.view(-1, 1, 1), learned, latents)
        return latents

    def forward(
        self,
        image_embeds: torch.Tensor,
        phrase_embeds: torch.Tensor,
        boxes: torch.Tensor,
        drop_grounding: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(S, L, embedding_dim) image features -> (S, num_queries, output_dim) subject tokens.

        `drop_grounding` (S,) bool replaces a subject's phrase+box latents by the learned ones;
        `image_mask` (S, L) bool marks real feature tokens when references of different counts are padded.
        """
        latents = self.grounding_queries(phrase_embeds, boxes, drop_grounding)
        x = self.proj_in(image_embeds)
        for attn, ff in self.layers:
            latents = attn(x, latents, image_mask) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(self.attention_norm(latents)))
