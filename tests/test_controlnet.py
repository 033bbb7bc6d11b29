import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.controlnets import MultiControlNetModel

from msdiffusion import MSDiffusionXLPipeline
from msdiffusion.adapter import ms_attention_state
from msdiffusion.attention import TextOnlyAttnProcessor
from msdiffusion.tiny import tiny_pipeline

IMG = PIL.Image.new("RGB", (40, 40), (120, 30, 200))
DEPTH = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1))).convert("RGB")
ARGS = dict(
    prompt="a dog and a cat",
    subject_images=[IMG, IMG],
    subject_phrases=["dog", "cat"],
    subject_boxes=[[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1, 0.8]],
    num_inference_steps=2,
    height=128,
    width=128,
    output_type="np",
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0, controlnet=True)


def cross_processors(model):
    return [p for name, p in model.attn_processors.items() if name.endswith("attn2.processor")]


def test_controlnet_sees_only_text_and_zero_conditioning_equals_plain_pipeline(pipe):
    assert all(isinstance(p, TextOnlyAttnProcessor) for p in cross_processors(pipe.controlnet))
    out = pipe(
        image=DEPTH, controlnet_conditioning_scale=0.0, generator=torch.Generator().manual_seed(0), **ARGS
    ).images
    plain = MSDiffusionXLPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"})
    plain.set_progress_bar_config(disable=True)
    expected = plain(generator=torch.Generator().manual_seed(0), **ARGS).images
    np.testing.assert_allclose(out, expected, atol=1e-5)
    guided = pipe(
        image=DEPTH, controlnet_conditioning_scale=1.0, generator=torch.Generator().manual_seed(0), **ARGS
    ).images
    assert not np.allclose(guided, expected, atol=1e-4)


def test_multi_controlnet_and_swapped_controlnet(pipe):
    original = pipe.controlnet
    try:
        second = tiny_pipeline(seed=3, controlnet=True).controlnet
        pipe.controlnet = MultiControlNetModel([original, second])
        out = pipe(image=[DEPTH, DEPTH], controlnet_conditioning_scale=[0.5, 0.5], **ARGS).images
        assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()
        state = ms_attention_state(pipe.unet)  # the new net's processors are re-bound at call time
        assert all(isinstance(p, TextOnlyAttnProcessor) and p.state is state for p in cross_processors(second))
    finally:
        pipe.controlnet = original
