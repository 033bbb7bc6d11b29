"""Image-to-image and inpainting pipelines (and their ControlNet variants) with subjects."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

from msdiffusion import (
    MSDiffusionXLControlNetImg2ImgPipeline,
    MSDiffusionXLControlNetInpaintPipeline,
    MSDiffusionXLImg2ImgPipeline,
    MSDiffusionXLInpaintPipeline,
    MSDiffusionXLPipeline,
)
from msdiffusion.adapter import cross_attention_layers
from msdiffusion.attention import MSAttnProcessor, TextOnlyAttnProcessor
from msdiffusion.tiny import tiny_adapter_checkpoint, tiny_image_encoder, tiny_pipeline, tiny_sdxl_components

PROMPT = "a dog on the beach"
HEIGHT, WIDTH = 128, 192
BOX = [48 / 192, 32 / 128, 144 / 192, 96 / 128]  # on pixel edges: rows 32:96, columns 48:144
INSIDE = (slice(32, 96), slice(48, 144))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def img2img(pipe):
    return MSDiffusionXLImg2ImgPipeline.from_pipe(pipe)


@pytest.fixture(scope="module")
def inpaint(pipe):
    return MSDiffusionXLInpaintPipeline.from_pipe(pipe)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    picture = PIL.Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    reference = PIL.Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8))
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[INSIDE] = 255
    return picture, reference, PIL.Image.fromarray(mask)


def run(pipeline, seed=0, **kwargs):
    args = dict(prompt=PROMPT, num_inference_steps=3, output_type="np")
    args.update(kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(generator=torch.Generator().manual_seed(seed), **args).images


def dog(reference, **extra):
    return dict(subject_images=[reference], subject_phrases=["dog"], subject_boxes=[BOX], **extra)


def inside_and_outside(change: np.ndarray) -> tuple[float, float]:
    per_pixel = np.abs(change).mean(axis=-1)[0]
    inside = per_pixel[INSIDE]
    return float(inside.mean()), float((per_pixel.sum() - inside.sum()) / (per_pixel.size - inside.size))


# ---- from_pipe ----------------------------------------------------------------------------


def test_from_pipe_shares_the_loaded_models_and_adapter(pipe, img2img, inpaint):
    for other in (img2img, inpaint, MSDiffusionXLPipeline.from_pipe(inpaint)):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder", "ms_image_projection"):
            assert getattr(other, name) is getattr(pipe, name), name
        assert other.feature_extractor is pipe.feature_extractor
    processors = [p for p in img2img.unet.attn_processors.values() if isinstance(p, MSAttnProcessor)]
    assert len(processors) == len(cross_attention_layers(img2img.unet))  # the adapter's, on every attn2
    assert all(p.state is processors[0].state for p in processors)


def test_from_pipe_keeps_the_dtype_of_the_shared_models():
    """diffusers' `from_pipe` casts to float32 unless told, which would cast the source pipeline's models too."""
    half = tiny_pipeline(seed=0).to(torch.bfloat16)
    other = MSDiffusionXLInpaintPipeline.from_pipe(half)
    assert other.unet.dtype == half.unet.dtype == torch.bfloat16
    assert half.ms_image_projection.dtype == torch.bfloat16
    assert MSDiffusionXLImg2ImgPipeline.from_pipe(half, dtype=torch.float32).unet.dtype == torch.float32


# ---- image-to-image -----------------------------------------------------------------------


def test_img2img_with_zero_scale_or_no_subjects_is_diffusers_bit_for_bit(pipe, img2img, pictures):
    picture, reference, _ = pictures
    plain = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    expected = run(plain, image=picture, strength=0.6, guidance_scale=7.5)
    np.testing.assert_array_equal(run(img2img, image=picture, strength=0.6, **dog(reference, ms_scale=0.0)), expected)
    np.testing.assert_array_equal(run(img2img, image=picture, strength=0.6), expected)
    with_dog = run(img2img, image=picture, strength=0.6, **dog(reference))
    np.testing.assert_array_equal(with_dog, run(img2img, image=picture, strength=0.6, **dog(reference)))  # seeded
    inside, outside = inside_and_outside(with_dog - expected)
    assert inside > 1.5 * outside, (inside, outside)  # the subject acts in its box


def test_img2img_strength_output_size_and_errors(img2img, pictures):
    picture, reference, _ = pictures
    # In latent space: the tiny VAE is random, so its pictures say little. The picture's latents, drawn
    # as the pipeline draws them from the same seed, stay nearly as they are at a small strength.
    with torch.no_grad():
        pixels = img2img.image_processor.preprocess(picture)
        start = img2img.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    start = start * img2img.vae.config.scaling_factor
    near = run(img2img, image=picture, strength=0.1, num_inference_steps=10, output_type="latent", **dog(reference))
    far = run(img2img, image=picture, strength=1.0, num_inference_steps=2, output_type="latent", **dog(reference))
    assert (near - start).abs().mean() < 0.1 * (far - start).abs().mean()

    quick = dict(strength=0.5, num_inference_steps=2)
    odd = picture.resize((201, 130))
    assert run(img2img, image=odd, **quick, **dog(reference)).shape == (1, 128, 200, 3)
    told = run(img2img, image=picture, height=64, width=96, **quick, **dog(reference))
    assert told.shape == (1, 64, 96, 3)
    array = np.asarray(picture).astype(np.float32) / 255  # arrays and tensors are resized too
    assert run(img2img, image=array[None], height=64, width=64, **quick).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"strength=0.3 of num_inference_steps=2 leaves no denoising step"):
        run(img2img, image=picture, num_inference_steps=2, **dog(reference))
    with pytest.raises(ValueError, match="height must be a positive multiple of 8, got 100"):
        run(img2img, image=picture, height=100, **quick, **dog(reference))
    with pytest.raises(ValueError, match="`image` is required"):
        run(img2img, **quick, **dog(reference))
    with pytest.raises(TypeError, match=r"'scale' \(did you mean ms_scale\?\)"):
        run(img2img, image=picture, scale=0.3, **quick, **dog(reference))


def test_img2img_batches_masks_and_prepared_subjects(img2img, pictures):
    picture, reference, mask = pictures
    other = picture.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    batch = img2img(
        prompt=[PROMPT, "a cat and a dog in the snow"],
        image=[picture, other],
        strength=0.6,
        subject_images=[[reference], [reference, reference]],
        subject_phrases=[["dog"], ["cat", "dog"]],
        subject_boxes=[[BOX], None],
        subject_masks=[None, [mask, [(0.0, 0.0), (0.4, 0.0), (0.0, 0.6)]]],
        num_images_per_prompt=2,
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    ).images
    assert batch.shape == (4, HEIGHT, WIDTH, 3)
    single = run(img2img, seed=0, image=picture, strength=0.6, num_inference_steps=2, **dog(reference))
    np.testing.assert_allclose(batch[0], single[0], atol=2e-4)

    prepared = img2img.prepare_subjects([reference], ["dog"], subject_masks=[mask])
    direct = run(img2img, image=picture, strength=0.6, subject_images=[reference], subject_phrases=["dog"], subject_masks=[mask])  # fmt: skip
    np.testing.assert_array_equal(run(img2img, image=picture, strength=0.6, prepared_subjects=prepared), direct)
    np.testing.assert_array_equal(run(img2img, image=picture, strength=0.6, **dog(reference)), direct)  # mask == box


def test_pictures_and_masks_given_one_per_prompt_stay_with_their_prompts(img2img, inpaint, pictures):
    """diffusers tiles the pictures over num_images_per_prompt (1, 2, 1, 2): each prompt's images must be
    drawn on that prompt's picture (and mask) all the same, as if the prompt had been run alone."""
    picture, reference, mask = pictures
    other = picture.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    other_mask = mask.transpose(PIL.Image.FLIP_TOP_BOTTOM)
    prompts = [PROMPT, "a cat in the snow"]

    def call(pipeline, prompt, seeds, **kwargs):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipeline(
            prompt=prompt, num_images_per_prompt=2, num_inference_steps=2, output_type="np",
            generator=generators, **kwargs,
        ).images  # fmt: skip

    as_array = torch.from_numpy(np.stack([np.asarray(picture), np.asarray(other)])).permute(0, 3, 1, 2) / 255
    for image in ([picture, other], as_array):
        batch = call(img2img, prompts, range(4), image=image, strength=0.6)
        alone = [call(img2img, p, [2 * k, 2 * k + 1], image=pic, strength=0.6) for k, (p, pic) in enumerate(zip(prompts, [picture, other]))]  # fmt: skip
        np.testing.assert_allclose(batch, np.concatenate(alone), atol=2e-4)

    # Inpainting samples the pictures' latents with each image's generator: alone, a picture is given twice.
    subjects = dict(subject_images=[[reference], [reference]], subject_phrases=[["dog"], ["cat"]])
    batch = call(inpaint, prompts, range(4), image=[picture, other], mask_image=[mask, other_mask], **subjects)
    alone = [
        call(inpaint, p, [2 * k, 2 * k + 1], image=[pic, pic], mask_image=[m, m], subject_images=[reference], subject_phrases=[phrase])
        for k, (p, pic, m, phrase) in enumerate(zip(prompts, [picture, other], [mask, other_mask], ["dog", "cat"]))
    ]  # fmt: skip
    np.testing.assert_allclose(batch, np.concatenate(alone), atol=2e-4)


def test_img2img_model_offload_keeps_the_image(pictures):
    picture, reference, _ = pictures
    pipeline = MSDiffusionXLImg2ImgPipeline.from_pipe(tiny_pipeline(seed=0))
    before = run(pipeline, image=picture, strength=0.6, num_inference_steps=2, **dog(reference))
    pipeline.enable_model_cpu_offload(device="cpu")
    after = run(pipeline, image=picture, strength=0.6, num_inference_steps=2, **dog(reference))
    np.testing.assert_allclose(after, before, atol=1e-5)


# ---- inpainting ---------------------------------------------------------------------------


def tiny_inpainting_unet_pipeline(tmp_path) -> MSDiffusionXLInpaintPipeline:
    """A tiny base whose UNet has SDXL-inpainting's 9 input channels (latents, mask, masked picture)."""
    components = tiny_sdxl_components(tmp_path / "tokenizer", seed=0)
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    pipeline = MSDiffusionXLInpaintPipeline(**components)
    pipeline.load_ms_adapter(tiny_adapter_checkpoint(pipeline.unet, 0), image_encoder=tiny_image_encoder(0))
    return pipeline


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_with_zero_scale_is_diffusers_bit_for_bit(inpaint, pictures, channels, tmp_path):
    picture, reference, mask = pictures
    pipeline = inpaint if channels == 4 else tiny_inpainting_unet_pipeline(tmp_path)
    assert pipeline.unet.config.in_channels == channels
    plain = StableDiffusionXLInpaintPipeline.from_pipe(pipeline)
    args = dict(image=picture, mask_image=mask)
    expected = run(plain, guidance_scale=7.5, height=HEIGHT, width=WIDTH, **args)
    np.testing.assert_array_equal(run(pipeline, **args, **dog(reference, ms_scale=0.0)), expected)
    np.testing.assert_array_equal(run(pipeline, **args), expected)  # the picture's size, not 1024
    inside, outside = inside_and_outside(run(pipeline, **args, **dog(reference)) - expected)
    assert inside > 1.5 * outside, (inside, outside)


def test_inpaint_sizes_and_errors(inpaint, pictures):
    picture, reference, mask = pictures
    told = run(inpaint, image=picture, mask_image=mask, height=64, width=64, num_inference_steps=2, **dog(reference))
    assert told.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="padding_mask_crop cannot be used with subjects"):
        run(inpaint, image=picture, mask_image=mask, padding_mask_crop=8, **dog(reference))
    with pytest.raises(ValueError, match="Give `mask_image`"):
        run(inpaint, image=picture)


# ---- the repainted part: the subjects' regions, the rest kept ------------------------------


def grown_box(margin: int) -> tuple[slice, slice]:
    return slice(32 - margin, 96 + margin), slice(48 - margin, 144 + margin)


def outside(image: np.ndarray, region: tuple[slice, slice]) -> np.ndarray:
    keep = np.ones(image.shape[:2], dtype=bool)
    keep[region] = False
    return image[keep]


@pytest.mark.parametrize("channels", [4, 9])
def test_without_a_mask_the_subjects_regions_are_repainted_and_the_rest_is_the_picture(
    inpaint, pictures, channels, tmp_path
):
    picture, reference, _ = pictures
    pipeline = inpaint if channels == 4 else tiny_inpainting_unet_pipeline(tmp_path)
    pipeline.set_progress_bar_config(disable=True)
    source = np.asarray(picture)
    out = pipeline(
        prompt=PROMPT,
        image=picture,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        **dog(reference),
    )
    made = np.asarray(out.images[0])
    margin = round(0.02 * HEIGHT)  # the default margin: 0.02 of the shorter side
    np.testing.assert_array_equal(outside(made, grown_box(margin)), outside(source, grown_box(margin)))
    assert np.abs(made[INSIDE].astype(int) - source[INSIDE]).mean() > 20  # the box is drawn anew
    alpha = out.repaint_masks[0, 0].numpy()
    assert alpha.shape == (HEIGHT, WIDTH) and alpha[64, 96] == 1 and alpha.min() == 0
    assert (alpha[outside_mask(grown_box(margin))] == 0).all()
    assert 0 < alpha[32 - margin, 96] < 1  # the feathered edge
    # Without the paste the kept part is diffusers' own: the picture's VAE round trip (for 4 channels).
    kept = run(pipeline, image=picture, keep_outside=False, **dog(reference))
    assert out.repaint_masks is not None and not np.array_equal(
        outside(kept[0], grown_box(margin)), outside(source / 255, grown_box(margin))
    )


def outside_mask(region: tuple[slice, slice]) -> np.ndarray:
    keep = np.ones((HEIGHT, WIDTH), dtype=bool)
    keep[region] = False
    return keep


def test_repaint_margin_feather_and_a_given_mask_kept_outside(inpaint, pictures):
    picture, reference, mask = pictures
    source = np.asarray(picture).astype(np.float32) / 255
    # No margin, no feather: exactly the box's pixels are generated.
    tight = run(inpaint, image=picture, repaint_margin=0, repaint_feather=0, **dog(reference))[0]
    np.testing.assert_allclose(outside(tight, INSIDE), outside(source, INSIDE), atol=1e-6)
    assert np.abs(tight[INSIDE] - source[INSIDE]).mean() > 0.05
    wide = run(inpaint, image=picture, repaint_margin=0.1, **dog(reference))[0]  # 13 pixels around the box
    ring = outside_mask(INSIDE) & ~outside_mask(grown_box(13))
    assert np.abs(wide[ring] - source[ring]).mean() > np.abs(tight[ring] - source[ring]).mean() + 0.02
    np.testing.assert_allclose(outside(wide, grown_box(13)), outside(source, grown_box(13)), atol=1e-6)
    # A mask given: diffusers' behaviour unless keep_outside=True, which pastes the picture outside it.
    given = run(inpaint, image=picture, mask_image=mask, keep_outside=True, repaint_feather=0, **dog(reference))[0]
    np.testing.assert_allclose(outside(given, INSIDE), outside(source, INSIDE), atol=1e-6)
    plain = run(inpaint, image=picture, mask_image=mask, **dog(reference))[0]
    np.testing.assert_allclose(given[INSIDE], plain[INSIDE], atol=1e-6)  # inside: the same generation


def test_repaint_regions_follow_each_prompts_subjects_in_a_batch(inpaint, pictures):
    picture, reference, _ = pictures
    left, right = [0.0, 0.0, 0.4, 0.5], [0.6, 0.5, 1.0, 1.0]
    images = run(
        inpaint,
        prompt=[PROMPT, PROMPT],
        image=picture,
        subject_images=[[reference], [reference]],
        subject_phrases=[["dog"], ["dog"]],
        subject_boxes=[[left], [right]],
        num_images_per_prompt=2,
        repaint_margin=0,
        repaint_feather=0,
    )
    source = np.asarray(picture).astype(np.float32) / 255
    regions = [(slice(0, 64), slice(0, 77)), (slice(64, 128), slice(115, 192))]  # ceil/floor of the fractions
    for k, image in enumerate(images):
        region = regions[k // 2]
        np.testing.assert_allclose(outside(image, region), outside(source, region), atol=1e-6)
        assert np.abs(image[region] - source[region]).mean() > 0.05


def test_a_subject_mask_shapes_the_repainted_part(inpaint, pictures):
    picture, reference, _ = pictures
    triangle = [(0.25, 0.25), (0.75, 0.25), (0.5, 0.75)]
    out = run(inpaint, image=picture, repaint_margin=0, repaint_feather=0, **dog(reference, subject_masks=[triangle]))[
        0
    ]
    source = np.asarray(picture).astype(np.float32) / 255
    corner = (slice(70, 96), slice(48, 60))  # inside the triangle's bounding box, outside the triangle
    np.testing.assert_allclose(out[corner], source[corner], atol=1e-6)
    assert np.abs(out[40:50, 90:100] - source[40:50, 90:100]).mean() > 0.05


def test_inpainting_on_a_plain_unet_of_another_latent_width(pictures, tmp_path):
    """A UNet on its VAE's latents of another width than SDXL's 4 (the world's 16) is a plain UNet: the
    picture's latents are blended in at every step, as diffusers does for 4 channels (which it alone accepts)."""
    from diffusers import AutoencoderKL

    picture, reference, mask = pictures
    components = tiny_sdxl_components(tmp_path / "tokenizer", seed=0)
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL.from_config({**components["vae"].config, "latent_channels": 8})
    unet_config = {**components["unet"].config, "in_channels": 8, "out_channels": 8}
    components["unet"] = UNet2DConditionModel.from_config(unet_config)
    pipeline = MSDiffusionXLInpaintPipeline(**components)
    pipeline.load_ms_adapter(tiny_adapter_checkpoint(pipeline.unet, 0), image_encoder=tiny_image_encoder(0))
    source = np.asarray(picture).astype(np.float32) / 255
    made = run(pipeline, image=picture, repaint_margin=0, repaint_feather=0, **dog(reference))[0]
    np.testing.assert_allclose(outside(made, INSIDE), outside(source, INSIDE), atol=1e-6)
    assert np.abs(made[INSIDE] - source[INSIDE]).mean() > 0.05
    # The picture's latents are blended in: the final latents outside the mask are the picture's whatever
    # the subjects do, and inside they are not.
    latents = [
        run(pipeline, image=picture, mask_image=mask, output_type="latent", **dog(reference, ms_scale=scale))[0]
        for scale in (0.0, 1.0)
    ]
    assert latents[0].shape[0] == 8
    inside_cells = (slice(None), slice(4, 12), slice(6, 18))
    keep = torch.ones(latents[0].shape, dtype=torch.bool)
    keep[inside_cells] = False
    assert torch.equal(latents[0][keep], latents[1][keep])
    assert not torch.allclose(latents[0][inside_cells], latents[1][inside_cells])
    assert pipeline.unet.config.in_channels == 8  # shown as 4 during the call only


def test_repaint_errors(inpaint, pictures):
    picture, reference, _ = pictures
    with pytest.raises(ValueError, match=r"repaint_margin must be in \[0, 0.5\]"):
        run(inpaint, image=picture, repaint_margin=-0.1, **dog(reference))
    with pytest.raises(ValueError, match="No subject has a box or a mask"):
        run(inpaint, image=picture, subject_images=[reference], subject_phrases=["dog"], subject_boxes=[[0, 0, 0, 0]])
    with pytest.raises(ValueError, match="keep_outside needs decoded images"):
        run(inpaint, image=picture, keep_outside=True, output_type="latent", **dog(reference))
    latents = run(inpaint, image=picture, output_type="latent", **dog(reference))  # the default: no paste
    assert latents.shape == (1, 4, HEIGHT // 8, WIDTH // 8)


# ---- ControlNet variants ------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet():
    return tiny_pipeline(seed=0, controlnet=True).controlnet


def test_controlnet_variants_see_only_text_and_zero_conditioning_equals_the_plain_ones(
    pipe, img2img, inpaint, controlnet, pictures
):
    picture, reference, mask = pictures
    depth = PIL.Image.fromarray(np.tile(np.linspace(0, 255, WIDTH, dtype=np.uint8), (HEIGHT, 1))).convert("RGB")
    cases = [
        (MSDiffusionXLControlNetImg2ImgPipeline, img2img, dict(image=picture, strength=0.6)),
        (MSDiffusionXLControlNetInpaintPipeline, inpaint, dict(image=picture, mask_image=mask)),
        (MSDiffusionXLControlNetInpaintPipeline, inpaint, dict(image=picture)),  # the subjects' regions repainted
    ]
    for cls, without, args in cases:
        pipeline = cls.from_pipe(pipe, controlnet=controlnet)
        assert pipeline.ms_image_projection is pipe.ms_image_projection
        args = {**args, **dog(reference), "num_inference_steps": 2}
        zero = run(pipeline, control_image=depth, controlnet_conditioning_scale=0.0, **args)
        assert all(
            isinstance(p, TextOnlyAttnProcessor)
            for name, p in controlnet.attn_processors.items()
            if name.endswith("attn2.processor")
        )
        assert zero.shape == (1, HEIGHT, WIDTH, 3)
        np.testing.assert_allclose(zero, run(without, **args), atol=1e-5)
        guided = run(pipeline, control_image=depth, controlnet_conditioning_scale=1.0, **args)
        assert not np.allclose(guided, zero, atol=1e-4)


# ---- one implementation of the method ----------------------------------------------------------


def test_one_unet_call_is_the_same_in_text_to_image_image_to_image_and_inpainting(pipe, img2img, inpaint, pictures):
    """The subject branch is one code path: with the same prompt and subjects, the UNet call each
    pipeline makes (its hidden states, its active layout and processors) gives exactly the same
    output for the same latents and timestep."""
    picture, reference, mask = pictures
    fixed = {}
    real_forward = pipe.unet.forward  # the three pipelines share this UNet (from_pipe)

    def recording(name):
        def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            if name not in fixed:  # the first call, with the pipeline's subject state active
                latents = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
                t = torch.tensor(500)
                out = real_forward(latents, t, encoder_hidden_states, *args, **kwargs)
                fixed[name] = (
                    encoder_hidden_states.clone(),
                    (out[0] if isinstance(out, tuple) else out.sample).clone(),
                )
            return real_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

        return forward

    subjects = dog(reference, subject_scales=[0.8])
    try:
        pipe.unet.forward = recording("text")
        run(pipe, height=HEIGHT, width=WIDTH, num_inference_steps=2, **subjects)
        pipe.unet.forward = recording("img2img")
        run(img2img, image=picture, strength=0.9, num_inference_steps=3, **subjects)
        pipe.unet.forward = recording("inpaint")
        run(inpaint, image=picture, mask_image=mask, strength=0.9, num_inference_steps=3, **subjects)
    finally:
        pipe.unet.forward = real_forward
    text_states, text_out = fixed["text"]
    for name in ("img2img", "inpaint"):
        states, out = fixed[name]
        assert torch.equal(states, text_states), name  # text and subject tokens
        assert torch.equal(out, text_out), name  # and what the UNet makes of them, layout included
    without = dog(reference, subject_scales=[0.0])
    pipe.unet.forward = recording("no subject")
    try:
        run(pipe, height=HEIGHT, width=WIDTH, num_inference_steps=2, **without)
    finally:
        pipe.unet.forward = real_forward
    assert not torch.equal(fixed["no subject"][1], text_out)  # the comparison sees the subject branch


def test_no_empty_float32_warning_from_the_vaes_upcast(inpaint, img2img, pictures, caplog):
    """diffusers casts the VAE to float32 to encode the picture and warns, naming no module; it is dropped."""
    picture, reference, mask = pictures
    with caplog.at_level("WARNING", logger="diffusers.models.modeling_utils"):
        run(inpaint, image=picture, num_inference_steps=2, **dog(reference))
        run(img2img, image=picture, strength=0.6, num_inference_steps=2)
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
