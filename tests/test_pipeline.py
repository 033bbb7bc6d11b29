import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from reference_impl import reference_box_cells, use_reference_processors

from msdiffusion import MSDiffusionXLImg2ImgPipeline
from msdiffusion.tiny import tiny_pipeline

PROMPT = "a dog and a cat on the beach"
BOXES = [[0.0, 0.25, 0.45, 0.75], [0.5, 0.2, 1.0, 0.8]]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def subject_images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)) for _ in range(3)]


def generate(pipe, seed=0, **kwargs):
    args = dict(prompt=PROMPT, num_inference_steps=3, height=128, width=128, output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def subjects(images, **extra):
    return dict(subject_images=images[:2], subject_phrases=["dog", "cat"], subject_boxes=BOXES, **extra)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"subject_scales": [0.9, None], "ms_scale": 0.5},
        {"mask_threshold": 0.3, "start_step": 2, "num_inference_steps": 4},
    ],
    ids=["boxes", "subject-scales", "auto-layout"],
)
def test_same_images_as_literal_reference(pipe, subject_images, extra):
    reference = tiny_pipeline(seed=0)
    use_reference_processors(reference.unet)
    args = subjects(subject_images, height=192, width=128, **extra)
    fast = generate(pipe, **args)
    slow = generate(reference, **args)
    np.testing.assert_allclose(fast, slow, atol=2e-4)


def test_unet_gets_the_text_alone_unless_a_processor_reads_appended_tokens(pipe, subject_images):
    """The project's processors take the subjects' keys/values projected on activation, so the UNet
    is called as bare SDXL is (no per-call slice and copy of the text); processors of their own
    (the literal reference here) still get the subject tokens appended to the text."""
    lengths = []
    hook = lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1])  # noqa: E731

    def run(p):
        handle = p.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            generate(p, num_inference_steps=1, **subjects(subject_images))
            generate(p, num_inference_steps=1)
        finally:
            handle.remove()
        return lengths.pop(0), lengths.pop(0)

    text = pipe.tokenizer.model_max_length
    assert run(pipe) == (text, text)
    reference = tiny_pipeline(seed=0)
    use_reference_processors(reference.unet)
    from msdiffusion.adapter import ms_attention_state

    with_subjects, plain = run(reference)
    assert plain == text and with_subjects > text
    with pytest.raises(ValueError, match="needs image_tokens"):
        with ms_attention_state(pipe.unet).activate(None, tokens_in_hidden_states=False):
            pass


def test_non_square_masks_cell_by_cell(pipe, subject_images, monkeypatch):
    from msdiffusion.adapter import ms_attention_state

    state = ms_attention_state(pipe.unet)
    seen = {}
    original = state.box_masks

    def spy(h, w, device, dtype):
        bias, inside = original(h, w, device, dtype)
        seen[(h, w)] = (bias, inside)
        return bias, inside

    monkeypatch.setattr(state, "box_masks", spy)
    generate(pipe, height=336, width=192, num_inference_steps=1, **subjects(subject_images))  # 1344x768 at 1/4
    assert set(seen) == {(21, 12), (11, 6)}  # latent 42x24; cross-attention at 1/2 and 1/4
    for (h, w), (bias, inside) in seen.items():
        visible = bias[0, 0] == 0  # (cells, tokens)
        for j, box in enumerate(BOXES):
            cells = reference_box_cells(box, h, w)
            tokens = slice(4 + 16 * j, 4 + 16 * (j + 1))
            for cell in range(h * w):
                assert bool(visible[cell, tokens].all()) == ((cell // w, cell % w) in cells)
                assert not visible[cell, tokens].any() or (cell // w, cell % w) in cells
        union = set().union(*(reference_box_cells(b, h, w) for b in BOXES))
        for cell in range(h * w):
            in_box = (cell // w, cell % w) in union
            assert bool(inside[0, cell, 0]) == in_box
            assert bool(visible[cell, :4].all()) == (not in_box)  # dummy tokens only outside boxes


def test_batch_with_different_subject_counts_matches_single_runs(pipe, subject_images):
    prompts = [PROMPT, "a teddy bear on the grass"]
    batch = pipe(
        prompt=prompts,
        subject_images=[subject_images[:2], [subject_images[2]]],
        subject_phrases=[["dog", "cat"], ["teddy bear"]],
        subject_boxes=[BOXES, [[0.2, 0.2, 0.8, 0.9]]],
        num_inference_steps=3,
        height=128,
        width=128,
        output_type="np",
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    ).images
    first = generate(pipe, seed=1, **subjects(subject_images))
    second = generate(
        pipe,
        seed=2,
        prompt=prompts[1],
        subject_images=[subject_images[2]],
        subject_phrases=["teddy bear"],
        subject_boxes=[[0.2, 0.2, 0.8, 0.9]],
    )
    np.testing.assert_allclose(batch[0], first[0], atol=2e-4)
    np.testing.assert_allclose(batch[1], second[0], atol=2e-4)


def test_shared_subjects_for_a_list_of_prompts_and_images_per_prompt(pipe, subject_images):
    out = pipe(
        prompt=[PROMPT, "a dog and a cat in the snow"],
        num_images_per_prompt=2,
        num_inference_steps=2,
        height=128,
        width=128,
        output_type="np",
        **subjects(subject_images),
    ).images
    assert out.shape == (4, 128, 128, 3)
    assert not np.allclose(out[0], out[1])


def test_without_subjects_it_is_plain_sdxl(pipe):
    components = {k: v for k, v in pipe.components.items() if k != "ms_image_projection"}
    plain = StableDiffusionXLPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    ours = generate(pipe)
    theirs = plain(
        prompt=PROMPT,
        num_inference_steps=3,
        height=128,
        width=128,
        guidance_scale=7.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_zero_scale_or_zero_boxes_leave_the_image_as_plain_sdxl(pipe, subject_images):
    plain = generate(pipe)
    np.testing.assert_allclose(generate(pipe, ms_scale=0.0, **subjects(subject_images)), plain, atol=1e-5)
    with pytest.warns(UserWarning, match="No subject has a box"):
        no_boxes = generate(pipe, subject_images=subject_images[:2], subject_phrases=["dog", "cat"])
    np.testing.assert_allclose(no_boxes, plain, atol=1e-5)
    assert not np.allclose(generate(pipe, **subjects(subject_images)), plain, atol=1e-3)


def test_subject_inputs_change_the_image(pipe, subject_images):
    base = generate(pipe, **subjects(subject_images))
    assert not np.allclose(base, generate(pipe, drop_grounding_tokens=True, **subjects(subject_images)), atol=1e-4)
    several = [subject_images[:2], subject_images[1]]  # two references for the dog
    out = generate(pipe, subject_images=several, subject_phrases=["dog", "cat"], subject_boxes=BOXES)
    assert not np.allclose(base, out, atol=1e-4)


def test_auto_layout_returns_maps_and_output_types(pipe, subject_images):
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=3,
        height=128,
        width=192,
        mask_threshold=0.5,
        start_step=2,
        output_type="pt",
        **subjects(subject_images),
    )
    assert out.images.shape == (1, 3, 128, 192)
    assert out.auto_layout_maps.shape == (1, 2, 8, 12)  # finest cross-attention grid: 16x24 latent / 2
    assert 0 <= out.auto_layout_maps.min() and out.auto_layout_maps.max() <= 1
    latents = pipe(
        prompt=PROMPT, num_inference_steps=1, height=128, width=128, output_type="latent", **subjects(subject_images)
    ).images
    assert latents.shape == (1, 4, 16, 16)
    images = pipe(
        prompt=PROMPT, num_inference_steps=1, height=128, width=128, return_dict=False, **subjects(subject_images)
    )[0]
    assert isinstance(images[0], PIL.Image.Image)


def test_other_sdxl_arguments_keep_working(pipe, subject_images):
    steps = []
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    try:
        generate(
            pipe,
            negative_prompt="blurry",
            guidance_rescale=0.3,
            callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw,
            **subjects(subject_images),
        )
    finally:
        pipe.scheduler = original
    assert steps == [0, 1, 2]


def test_a_misspelt_argument_is_refused_not_dropped(pipe, subject_images):
    """diffusers' own `__call__` drops unknown keywords unread: `scale=0.3` would run at ms_scale 0.6."""
    with pytest.raises(TypeError, match=r"'scale' \(did you mean ms_scale\?\)"):
        generate(pipe, scale=0.3, **subjects(subject_images))
    with pytest.raises(TypeError, match="'num_inference_step' .*num_inference_steps"):
        generate(pipe, num_inference_step=2)  # the plain-SDXL path too
    with pytest.warns(FutureWarning):  # diffusers' deprecated callbacks still reach it
        generate(pipe, callback_steps=1, callback=lambda *a: None, **subjects(subject_images))


def test_lora_and_model_offload_keep_working(subject_images, tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA loading needs peft (in the test extra)")
    from diffusers.utils import convert_state_dict_to_diffusers

    donor = tiny_pipeline(seed=0).unet
    donor.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in donor.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the LoRA do something
            torch.nn.init.normal_(param, std=0.1)
    layers = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(donor))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={k: v for k, v in layers.items() if "processor" not in k}
    )

    pipe = tiny_pipeline(seed=0)
    before = generate(pipe, **subjects(subject_images))
    pipe.load_lora_weights(tmp_path)
    with_lora = generate(pipe, **subjects(subject_images))
    assert not np.allclose(before, with_lora, atol=1e-3)
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks include the image projection component
    np.testing.assert_allclose(generate(pipe, **subjects(subject_images)), with_lora, atol=1e-5)


def test_reference_combine_mean_averages_each_references_tokens(pipe, subject_images):
    from msdiffusion.subjects import Subject

    device = torch.device("cpu")
    a, b = subject_images[0], subject_images[1]
    box = tuple(BOXES[0])

    def tokens(images, combine):
        return pipe.encode_subjects([[Subject(images, "dog", box)]], device, reference_combine=combine)

    mean = tokens([a, b], "mean")
    n = pipe.ms_image_projection.dummy_image_tokens.shape[1]
    expected = (tokens([a], "concat")[:, n:] + tokens([b], "concat")[:, n:]) / 2
    torch.testing.assert_close(mean[:, n:], expected)
    assert not torch.allclose(tokens([a, b], "concat")[:, n:], expected, atol=1e-4)  # concat resamples them together
    torch.testing.assert_close(tokens([a], "mean"), tokens([a], "concat"))  # one image: the same
    images = generate(pipe, **subjects([[a, b], subject_images[2]], reference_combine="mean"))
    assert np.isfinite(images).all()
    with pytest.raises(ValueError, match="reference_combine must be one of concat, mean"):
        generate(pipe, **subjects(subject_images, reference_combine="average"))


def test_prepared_subjects_give_the_same_images_without_encoding_again(pipe, subject_images):
    prepared = pipe.prepare_subjects(subject_images[:2], ["dog", "cat"], BOXES)
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a: calls.append(1)) for m in (pipe.image_encoder, pipe.ms_image_projection)
    ]
    try:
        for seed in (0, 1):  # reused across generations
            expected = generate(pipe, seed, **subjects(subject_images))
            np.testing.assert_array_equal(generate(pipe, seed, prepared_subjects=prepared), expected)
        assert (
            len(calls) == 4
        )  # two encodings of the subject arguments (encoder + resampler each), none of the prepared
    finally:
        for hook in hooks:
            hook.remove()

    # a list of prompts: one row per prompt, or one row shared by all
    prompts = [PROMPT, "a cat and a dog in the snow"]
    per_prompt = dict(
        subject_images=[subject_images[:2], subject_images[1:]],
        subject_phrases=[["dog", "cat"], ["cat", "dog"]],
        subject_boxes=[BOXES, BOXES[::-1]],
    )
    rows = pipe.prepare_subjects(**per_prompt, num_prompts=2)
    expected = generate(pipe, prompt=prompts, **per_prompt)
    np.testing.assert_array_equal(generate(pipe, prompt=prompts, prepared_subjects=rows), expected)
    shared = generate(pipe, prompt=prompts, **subjects(subject_images))  # encodes the shared subjects once per prompt
    got = generate(pipe, prompt=prompts, prepared_subjects=prepared)
    np.testing.assert_allclose(got, shared, atol=1e-5)  # another batch of the encoders, other rounding


def test_prepared_subjects_refuse_what_they_would_ignore(pipe, subject_images):
    prepared = pipe.prepare_subjects(subject_images[:2], ["dog", "cat"], BOXES, drop_grounding_tokens=True)
    with pytest.raises(ValueError, match="either prepared_subjects or subject_boxes"):
        generate(pipe, prepared_subjects=prepared, subject_boxes=BOXES)
    with pytest.raises(
        ValueError, match=r"reference_size=224, but the prepared subjects were encoded with reference_size=512"
    ):
        generate(pipe, prepared_subjects=prepared, reference_size=224)
    with pytest.raises(ValueError, match="subjects of 2 prompts but 3 were given"):
        generate(
            pipe,
            prompt=[PROMPT] * 3,
            prepared_subjects=pipe.prepare_subjects(**subjects(subject_images), num_prompts=2),
        )
    expected = generate(pipe, drop_grounding_tokens=True, **subjects(subject_images))
    np.testing.assert_array_equal(generate(pipe, prepared_subjects=prepared), expected)  # its own setting, unasked
    np.testing.assert_array_equal(generate(pipe, prepared_subjects=prepared, drop_grounding_tokens=True), expected)


def test_a_generation_walks_the_models_for_their_device_and_processors_once(pipe, subject_images, monkeypatch):
    """diffusers finds the execution device by walking every module of every component, and the
    processors by walking the UNet's: milliseconds each on SDXL, paid per generation on a GPU."""
    import diffusers.hooks.group_offloading as group_offloading

    walks = {"device": 0, "processors": 0}
    find_device = group_offloading._get_group_onload_device
    processors = type(pipe.unet).attn_processors

    def counted_device(module):
        walks["device"] += 1
        return find_device(module)

    def counted_processors(unet):
        walks["processors"] += 1
        return processors.fget(unet)

    monkeypatch.setattr(group_offloading, "_get_group_onload_device", counted_device)
    monkeypatch.setattr(type(pipe.unet), "attn_processors", property(counted_processors))
    generate(pipe, num_inference_steps=1)
    plain = walks["device"]
    generate(pipe, num_inference_steps=1, **subjects(subject_images))
    assert walks["device"] - plain == plain  # as many as plain SDXL (it was one more of every component)
    assert walks["processors"] == 2  # one per generation
    assert pipe._execution_device == torch.device("cpu")  # the pinned device does not outlive the call


# ---- few steps: no classifier-free guidance, or a guidance-embedding (LCM-distilled) UNet ----------------


def lcm_distilled_pipeline(seed: int = 0):
    """A tiny pipeline whose UNet takes the guidance scale as an embedding (`time_cond_proj_dim`), as
    LCM-distilled SDXL UNets do: the pipeline then runs no negative branch at any guidance."""
    import tempfile

    from diffusers import UNet2DConditionModel

    from msdiffusion import MSDiffusionXLPipeline
    from msdiffusion.tiny import tiny_adapter_checkpoint, tiny_image_encoder, tiny_sdxl_components

    components = tiny_sdxl_components(tempfile.mkdtemp(prefix="msdiff-lcm-"), seed)
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel.from_config(components["unet"].config, time_cond_proj_dim=16)
    pipe = MSDiffusionXLPipeline(**components)
    pipe.load_ms_adapter(tiny_adapter_checkpoint(pipe.unet, seed), image_encoder=tiny_image_encoder(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "make,guidance",
    [(tiny_pipeline, 1.0), (tiny_pipeline, 0.0), (lcm_distilled_pipeline, 8.0)],
    ids=["guidance-1", "guidance-0", "guidance-embedding"],
)
def test_few_step_settings_without_a_negative_branch_match_the_literal_reference(subject_images, make, guidance):
    """Few-step setups (SDXL-Lightning, Hyper-SD, DMD2 and LCM LoRAs at guidance <= 1; LCM-distilled UNets
    with a guidance embedding) run the UNet on the conditional batch alone: the subjects still act, exactly
    as the released computation has them act."""
    pipe, reference = make(seed=0), make(seed=0)
    use_reference_processors(reference.unet)
    seen = []
    real_forward = pipe.unet.forward

    def forward(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        return real_forward(sample, *args, **kwargs)

    pipe.unet.forward = forward
    args = subjects(subject_images, guidance_scale=guidance, num_inference_steps=4, height=128, width=192)
    fast = generate(pipe, **args)
    assert seen and set(seen) == {1}  # no negative branch
    np.testing.assert_allclose(fast, generate(reference, **args), atol=2e-4)
    without = generate(pipe, **{**args, "ms_scale": 0.0})
    assert np.abs(fast - without).mean() > 1e-3  # the subjects act


def test_image_encoder_offload_moves_it_only_around_encoding(subject_images, monkeypatch):
    """`enable_image_encoder_offload`: the encoder rests on the CPU and visits the execution device only to
    encode (on a CPU-only machine the moves are no-ops and the image is the same)."""
    pipe = tiny_pipeline(seed=0)
    expected = generate(pipe, **subjects(subject_images))
    pipe.enable_image_encoder_offload()
    assert next(pipe.image_encoder.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(generate(pipe, **subjects(subject_images)), expected)
    img2img = MSDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    moves = []
    monkeypatch.setattr(pipe.image_encoder, "to", lambda device: moves.append(str(device)))
    with pipe._image_encoder_on(torch.device("cuda")):
        moves.append("encode")
    assert moves == ["cuda", "encode", "cpu"]
    with pytest.raises(RuntimeError), pipe._image_encoder_on(torch.device("cuda")):
        raise RuntimeError("an encoding that fails")
    assert moves[-1] == "cpu"  # back even then
    # A pipeline made from it shares the resting encoder, so it brings it to the device to encode too.
    moves.clear()
    with img2img._image_encoder_on(torch.device("cuda")):
        moves.append("encode")
    assert moves == ["cuda", "encode", "cpu"]


def test_image_encoder_offload_from_a_job_field_and_the_page(tmp_path, monkeypatch):
    from msdiffusion import loading
    from msdiffusion.app.page_command import models_from_args
    from msdiffusion.settings import ModelSettings

    calls = []
    monkeypatch.setattr(
        "msdiffusion.pipelines.MSDiffusionMixin.enable_image_encoder_offload", lambda self: calls.append(type(self))
    )
    loading.load_pipeline(ModelSettings(base="tiny-random", adapter="tiny-random", image_encoder="tiny-random"))
    assert calls == []
    models = ModelSettings(
        base="tiny-random", adapter="tiny-random", image_encoder="tiny-random", image_encoder_offload=True
    )
    loading.load_pipeline(models)
    assert len(calls) == 1
    import argparse

    args = argparse.Namespace(
        job=None,
        base="tiny-random",
        adapter="tiny-random",
        image_encoder="tiny-random",
        adapter_weight_name=None,
        device=None,
        dtype=None,
        cpu_offload=True,
        image_encoder_offload=True,
    )
    settings = models_from_args(args).model_settings()
    assert settings.cpu_offload and settings.image_encoder_offload
