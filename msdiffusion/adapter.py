"""The MS-Diffusion adapter: attach it to a UNet; load, save and convert its checkpoints.

The adapter has two parts. `MSImageProjection` (grounding resampler + dummy tokens) turns subjects
into image tokens; it is a pipeline component. The `to_k_ip` / `to_v_ip` projections live in the
`MSAttnProcessor` of every UNet `attn2`, like diffusers' IP-Adapter processors.

Two checkpoint formats:
- released: `ms_adapter.bin`, a `torch.save` dict with `image_proj` (resampler state dict),
  `ms_adapter` (`{i}.to_k_ip.weight` / `{i}.to_v_ip.weight`, `i` = index of the layer in
  `unet.attn_processors`) and `dummy_image_tokens`; it carries no config, so the resampler's
  architecture is inferred from tensor shapes;
- project: a folder with `ms_adapter.safetensors` (the same tensors, keys prefixed by section:
  `image_proj.*`, `ms_adapter.*`, `dummy_image_tokens`) and `ms_adapter_config.json`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin

from .attention import MSAttentionState, MSAttnProcessor, TextOnlyAttnProcessor
from .layout import SubjectLayout
from .resampler import GroundingResampler, ResamplerConfig

RELEASED_WEIGHT_NAME = "ms_adapter.bin"
PROJECT_WEIGHT_NAME = "ms_adapter.safetensors"
PROJECT_CONFIG_NAME = "ms_adapter_config.json"
PROJECT_FORMAT = "msdiffusion-adapter"
_ATTENTION_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


class AdapterMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


class MSImageProjection(ModelMixin, ConfigMixin):
    """Grounding resampler plus the dummy image tokens: subjects -> image tokens for the UNet."""

    @register_to_config
    def __init__(self, resampler: dict | None = None, num_dummy_tokens: int = 4):
        super().__init__()
        config = ResamplerConfig(**(resampler or {}))
        self.image_proj = GroundingResampler(config)
        self.dummy_image_tokens = nn.Parameter(torch.zeros(1, num_dummy_tokens, config.output_dim))

    @property
    def resampler_config(self) -> ResamplerConfig:
        return self.image_proj.config

    def forward(
        self,
        image_embeds: torch.Tensor,
        phrase_embeds: torch.Tensor,
        boxes: torch.Tensor,
        drop_grounding: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.image_proj(image_embeds, phrase_embeds, boxes, drop_grounding, image_mask)

    def token_block(
        self, subject_tokens: torch.Tensor, counts: Sequence[int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The UNet's image tokens, one row per sample: `[dummy tokens | its subjects' tokens | zeros]`.

        `subject_tokens` (S, Q, D) are the resampler's tokens of every row's subjects in turn, `counts[b]`
        of them for row b; a row with fewer than `max(counts)` subjects is padded with zero tokens.
        Returns (B, dummy + max(counts) * Q, D) in `dtype` (default: the subject tokens' dtype).
        """
        dtype = subject_tokens.dtype if dtype is None else dtype
        device = subject_tokens.device
        dummy = self.dummy_image_tokens.to(device, dtype)
        num_dummy, width = dummy.shape[1], subject_tokens.shape[-1]
        out = torch.zeros(
            len(counts), num_dummy + max(counts) * subject_tokens.shape[1], width, device=device, dtype=dtype
        )
        out[:, :num_dummy] = dummy
        start = 0
        for b, count in enumerate(counts):
            block = subject_tokens[start : start + count].reshape(-1, width)
            out[b, num_dummy : num_dummy + block.shape[0]] = block
            start += count
        return out

    def subject_layout(self, boxes: torch.Tensor, latent_size: tuple[int, int], **options: Any) -> SubjectLayout:
        """The layout of `token_block`'s rows: (B, N, 4) boxes, all-zero for a slot with no box or no
        subject; `options` are `SubjectLayout`'s other fields (scale, phrase positions, auto layout)."""
        # The token counts come from this projection, so that the masks line up with its token block.
        return SubjectLayout(
            boxes=boxes,
            latent_size=latent_size,
            tokens_per_subject=self.resampler_config.num_queries,
            num_dummy_tokens=self.dummy_image_tokens.shape[1],
            **options,
        )


@dataclass
class MSAdapterCheckpoint:
    """An adapter checkpoint in memory, independent of its file format."""

    image_proj: dict[str, torch.Tensor]
    attention: dict[int, dict[str, torch.Tensor]]  # processor index -> {"to_k_ip.weight", "to_v_ip.weight"}
    dummy_image_tokens: torch.Tensor
    resampler_config: ResamplerConfig

    @property
    def num_dummy_tokens(self) -> int:
        return self.dummy_image_tokens.shape[1]

    def image_projection(self) -> MSImageProjection:
        projection = MSImageProjection(self.resampler_config.to_dict(), self.num_dummy_tokens)
        expected = projection.state_dict()
        given = {f"image_proj.{k}": v for k, v in self.image_proj.items()}
        given["dummy_image_tokens"] = self.dummy_image_tokens
        _check_shapes(given, {k: tuple(v.shape) for k, v in expected.items()}, "the grounding resampler")
        projection.load_state_dict(given)
        return projection

    # ---- released format -------------------------------------------------------------------
    @classmethod
    def from_released(cls, state: dict) -> "MSAdapterCheckpoint":
        for section in ("image_proj", "ms_adapter"):
            if section not in state:
                raise AdapterMismatchError(
                    f"Not an MS-Diffusion checkpoint: no {section!r} section (found {sorted(state)[:5]})."
                )
        attention: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in state["ms_adapter"].items():
            match = _ATTENTION_KEY.match(key)
            if not match:
                raise AdapterMismatchError(
                    f"Unexpected key 'ms_adapter.{key}': expected '<i>.to_k_ip.weight' / '<i>.to_v_ip.weight'."
                )
            attention.setdefault(int(match[1]), {})[f"{match[2]}.weight"] = tensor
        image_proj = dict(state["image_proj"])
        dummy = state.get("dummy_image_tokens")
        if dummy is None:  # not optimised by the release anyway: its image output is always zeroed
            dummy = torch.zeros(1, 4, image_proj["proj_out.weight"].shape[0])
        try:
            config = ResamplerConfig.from_state_dict(image_proj)
        except KeyError as error:
            raise AdapterMismatchError(
                f"The 'image_proj' section lacks {error.args[0]!r}: not a grounding resampler."
            ) from None
        return cls(image_proj, attention, dummy, config)

    def released_state(self) -> dict:
        attention = {f"{i}.{name}": t for i, weights in sorted(self.attention.items()) for name, t in weights.items()}
        return {"image_proj": self.image_proj, "ms_adapter": attention, "dummy_image_tokens": self.dummy_image_tokens}

    # ---- project format --------------------------------------------------------------------
    def save_project(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"image_proj.{k}": v for k, v in self.image_proj.items()}
        tensors.update({f"ms_adapter.{k}": v for k, v in self.released_state()["ms_adapter"].items()})
        tensors["dummy_image_tokens"] = self.dummy_image_tokens
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / PROJECT_WEIGHT_NAME)
        config = {
            "format": PROJECT_FORMAT,
            "version": 1,
            "resampler": self.resampler_config.to_dict(),
            "num_dummy_tokens": self.num_dummy_tokens,
            "num_attention_layers": len(self.attention),
        }
        (directory / PROJECT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load_project(cls, directory: str | os.PathLike) -> "MSAdapterCheckpoint":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / PROJECT_CONFIG_NAME).read_text())
        if config.get("format") != PROJECT_FORMAT:
            raise AdapterMismatchError(f"{directory / PROJECT_CONFIG_NAME} is not an MS-Diffusion adapter config.")
        state = _sections(load_file(directory / PROJECT_WEIGHT_NAME), directory / PROJECT_WEIGHT_NAME)
        checkpoint = cls.from_released(state)
        checkpoint.resampler_config = ResamplerConfig(**config["resampler"])
        return checkpoint

    def save(self, path: str | os.PathLike) -> Path:
        """Write the released format if `path` ends in `.bin`, else the project format (a folder)."""
        path = Path(path)
        if path.suffix == ".bin":
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: _cpu(v) for k, v in self.released_state().items()}, path)
            return path
        return self.save_project(path)


def _sections(tensors: dict[str, torch.Tensor], source) -> dict:
    """Flat `section.key` tensors (project format) -> the released nested layout."""
    state: dict = {"image_proj": {}, "ms_adapter": {}}
    for key, tensor in tensors.items():
        section, _, rest = key.partition(".")
        if key == "dummy_image_tokens":
            state["dummy_image_tokens"] = tensor
        elif section in state:
            state[section][rest] = tensor
        else:
            raise AdapterMismatchError(f"Unexpected key {key!r} in {source}.")
    return state


def _cpu(value):
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value.detach().contiguous().cpu()


def load_checkpoint(
    path_or_id: str | os.PathLike,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs,
) -> MSAdapterCheckpoint:
    """Read an adapter from a `.bin` file, a project folder, a folder holding `ms_adapter.bin`, or a hub repo."""
    from .weight_files import safetensors_problem, torch_file_problem

    path = resolve_adapter_path(path_or_id, weight_name, subfolder, **hub_kwargs)
    # Check the file before reading it: a truncated or foreign file otherwise fails deep in
    # safetensors or pickle with a message that does not say which file or what was expected.
    weights = path / PROJECT_WEIGHT_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise FileNotFoundError(f"{path} has {PROJECT_CONFIG_NAME} but no {PROJECT_WEIGHT_NAME}.")
    problem = safetensors_problem(weights) if weights.suffix == ".safetensors" else torch_file_problem(weights)
    if problem:
        raise AdapterMismatchError(f"Cannot read the adapter {weights}: {problem}.")
    if path.is_dir():
        return MSAdapterCheckpoint.load_project(path)
    if path.suffix == ".safetensors":
        if (path.parent / PROJECT_CONFIG_NAME).is_file():
            return MSAdapterCheckpoint.load_project(path.parent)
        from safetensors.torch import load_file

        state = _sections(load_file(path), path)
        return MSAdapterCheckpoint.from_released(state)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors have many types
        raise AdapterMismatchError(
            f"Cannot read {path} as a torch checkpoint: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise AdapterMismatchError(f"{path} holds a {type(state).__name__}, not an MS-Diffusion checkpoint dict.")
    return MSAdapterCheckpoint.from_released(state)


def resolve_adapter_path(path_or_id, weight_name=None, subfolder=None, **hub_kwargs) -> Path:
    """The local file or project folder an adapter reference points to (downloading a hub repo's)."""
    path = Path(path_or_id)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if weight_name:
            candidate = folder / weight_name
            if not candidate.exists():
                raise FileNotFoundError(f"No {weight_name!r} in {folder}.")
            return candidate
        if (folder / PROJECT_CONFIG_NAME).is_file():
            return folder
        if (folder / RELEASED_WEIGHT_NAME).is_file():
            return folder / RELEASED_WEIGHT_NAME
        raise FileNotFoundError(
            f"{folder} holds no adapter: expected {PROJECT_CONFIG_NAME} + {PROJECT_WEIGHT_NAME} (project format) "
            f"or {RELEASED_WEIGHT_NAME} (released format); pass weight_name= for another file name."
        )
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"Adapter {str(path_or_id)!r} is neither an existing file or folder nor a hub repo id.")
    return _download(str(path_or_id), weight_name, subfolder, **hub_kwargs)


def _download(repo_id: str, weight_name, subfolder, **hub_kwargs) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder, **hub_kwargs))

    try:
        if weight_name:
            return get(weight_name)
        try:
            config = get(PROJECT_CONFIG_NAME)
            get(PROJECT_WEIGHT_NAME)
            return config.parent
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):
                raise
            return get(RELEASED_WEIGHT_NAME)
    except LocalEntryNotFoundError as error:  # offline, or the hub is unreachable, and not in the cache
        raise OSError(
            f"Cannot download the adapter {repo_id!r} (offline or no network, and not in the local cache): "
            f"download it where there is network (`hf download {repo_id} {weight_name or RELEASED_WEIGHT_NAME}`) "
            "and pass the local file or folder."
        ) from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no adapter file ({error}).") from error


def _check_shapes(given: dict[str, torch.Tensor], expected: dict[str, tuple], what: str) -> None:
    """Raise naming the first key that is missing, unexpected, or of the wrong shape."""
    for key, shape in expected.items():
        if key not in given:
            raise AdapterMismatchError(f"Checkpoint does not fit {what}: missing key {key!r} (expected shape {shape}).")
        if tuple(given[key].shape) != tuple(shape):
            raise AdapterMismatchError(
                f"Checkpoint does not fit {what}: key {key!r} has shape {tuple(given[key].shape)}, expected {tuple(shape)}."
            )
    for key in given:
        if key not in expected:
            raise AdapterMismatchError(f"Checkpoint does not fit {what}: unexpected key {key!r}.")


def cross_attention_layers(unet) -> dict[int, str]:
    """Index in `unet.attn_processors` -> module name, for every cross-attention (`attn2`) layer."""
    return {
        i: name.removesuffix(".processor")
        for i, name in enumerate(unet.attn_processors)
        if name.endswith("attn2.processor")
    }


def cross_attention_levels(unet) -> tuple[int, ...] | None:
    """The UNet levels (number of 2x downsamplings of the latent) where `attn2` layers run, read
    from their names (down_blocks.i: level i; up_blocks.i: depth - 1 - i; mid_block: the lowest);
    None for a UNet named otherwise (masks are then built for every level)."""
    levels = [layer_level(unet, name) for name in cross_attention_layers(unet).values()]
    return None if None in levels else tuple(sorted(set(levels)))


def layer_level(unet, name: str) -> int | None:
    """The level of the layer called `name` (see `cross_attention_levels`), None if its name does not say."""
    depth = len(getattr(unet.config, "block_out_channels", ()))
    block, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    if block == "down_blocks" and index.isdigit():
        return int(index)
    if block == "up_blocks" and index.isdigit() and depth:
        return depth - 1 - int(index)
    if block == "mid_block" and depth:
        return depth - 1
    return None


def expected_attention_shapes(unet) -> dict[str, tuple]:
    """The released-format keys (`{i}.to_k_ip.weight`, ...) and shapes an adapter for `unet` must have."""
    shapes = {}
    for i, name in cross_attention_layers(unet).items():
        to_k = unet.get_submodule(name).to_k
        for proj in ("to_k_ip", "to_v_ip"):
            shapes[f"{i}.{proj}.weight"] = (to_k.out_features, to_k.in_features)
    return shapes


def check_fits_unet(checkpoint: MSAdapterCheckpoint, unet) -> None:
    """Raise `AdapterMismatchError` naming the first key that does not fit `unet`."""
    given = {f"{i}.{k}": v for i, weights in checkpoint.attention.items() for k, v in weights.items()}
    _check_shapes(given, expected_attention_shapes(unet), "this UNet's cross-attention layers")
    cross_dim = unet.config.cross_attention_dim
    if checkpoint.resampler_config.output_dim != cross_dim:
        raise AdapterMismatchError(
            f"Checkpoint does not fit this UNet: the resampler outputs {checkpoint.resampler_config.output_dim}-d tokens "
            f"(image_proj.proj_out.weight), the UNet's cross_attention_dim is {cross_dim}."
        )


def attach_ms_attention(
    unet, attention: dict[int, dict[str, torch.Tensor]] | None = None, controlnets=()
) -> MSAttentionState:
    """Give every `attn2` of `unet` an `MSAttnProcessor` (weights from `attention`, or initialised
    from the layer's `to_k` / `to_v` as in training) and ControlNets text-only processors."""
    state = MSAttentionState(levels=cross_attention_levels(unet))

    def make(index: int, name: str) -> MSAttnProcessor:
        layer = unet.get_submodule(name)
        processor = MSAttnProcessor(
            layer.to_k.out_features, layer.to_k.in_features, state, heads=layer.heads, level=layer_level(unet, name)
        )
        if attention is not None:
            processor.load_state_dict(attention[index])
        else:
            processor.to_k_ip.weight.data.copy_(layer.to_k.weight.data)
            processor.to_v_ip.weight.data.copy_(layer.to_v.weight.data)
        return processor.to(layer.to_k.weight.device, layer.to_k.weight.dtype)

    replace_cross_attention(unet, make)
    attach_text_only(controlnets, state)
    return state


def replace_cross_attention(model, make: Callable[[int, str], Any]) -> None:
    """Give every `attn2` of `model` (a UNet or a ControlNet) the processor `make(index, layer name)`,
    keeping every other processor; `index` is the layer's position in `model.attn_processors`, the
    key of its weights in a checkpoint (see `cross_attention_layers`)."""
    # One walk of the modules: the ControlNet pipeline re-attaches its processors at every call.
    processors = {
        name: make(i, name.removesuffix(".processor")) if name.endswith("attn2.processor") else processor
        for i, (name, processor) in enumerate(model.attn_processors.items())
    }
    model.set_attn_processor(processors)


def attach_text_only(controlnets, state: MSAttentionState) -> None:
    """ControlNets share the UNet's encoder hidden states but must see only the text tokens."""
    for controlnet in _controlnet_list(controlnets):
        replace_cross_attention(controlnet, lambda index, name: TextOnlyAttnProcessor(state))


def attach_full_attention(controlnets) -> None:
    """Plain attention on the ControlNets' `attn2`: they attend over all encoder hidden states, subject
    tokens included. This is what the released `inference_controlnet.py` does (it never hands the
    ControlNet to the adapter); `attach_text_only` is the intended behaviour and the default."""
    for controlnet in _controlnet_list(controlnets):
        replace_cross_attention(controlnet, _plain_attention)


def _controlnet_list(controlnets) -> list:
    if controlnets is None:
        return []
    if hasattr(controlnets, "nets"):  # MultiControlNetModel
        return list(controlnets.nets)
    if isinstance(controlnets, (list, tuple)):
        return [net for c in controlnets for net in _controlnet_list(c)]
    return [controlnets]


def detach_ms_attention(unet, controlnets=()) -> None:
    """Restore plain attention on every `attn2`."""
    for model in [unet, *_controlnet_list(controlnets)]:
        replace_cross_attention(model, _plain_attention)


def _plain_attention(index: int, name: str) -> AttnProcessor2_0:
    return AttnProcessor2_0()


def ms_attention_state(unet) -> MSAttentionState | None:
    """The shared state of the MS-Diffusion processors attached to `unet`, if any."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, MSAttnProcessor):
            return processor.state
    return None


def initial_checkpoint(unet, resampler_config: ResamplerConfig, num_dummy_tokens: int = 4) -> MSAdapterCheckpoint:
    """A new adapter for `unet` as training starts it: random resampler, `to_k_ip`/`to_v_ip` = `to_k`/`to_v`."""
    projection = MSImageProjection(resampler_config.to_dict(), num_dummy_tokens)
    attention = {}
    for i, name in cross_attention_layers(unet).items():
        layer = unet.get_submodule(name)
        attention[i] = {
            "to_k_ip.weight": layer.to_k.weight.detach().clone(),
            "to_v_ip.weight": layer.to_v.weight.detach().clone(),
        }
    state = projection.state_dict()
    image_proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    return MSAdapterCheckpoint(image_proj, attention, state["dummy_image_tokens"], resampler_config)


def checkpoint_from_models(unet, projection: MSImageProjection) -> MSAdapterCheckpoint:
    """Gather a checkpoint from a UNet with attached processors and its image projection."""
    processors = unet.attn_processors
    names = list(processors)
    attention = {}
    for i, name in cross_attention_layers(unet).items():
        processor = processors[names[i]]
        if not isinstance(processor, MSAttnProcessor):
            raise ValueError(f"{name} has no MS-Diffusion processor: attach the adapter first.")
        attention[i] = {k: v.detach().clone() for k, v in processor.state_dict().items()}
    state = projection.state_dict()
    image_proj = {
        k.removeprefix("image_proj."): v.detach().clone() for k, v in state.items() if k.startswith("image_proj.")
    }
    return MSAdapterCheckpoint(
        image_proj, attention, state["dummy_image_tokens"].detach().clone(), projection.resampler_config
    )
