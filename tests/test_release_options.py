"""Where the project follows the released MS-Diffusion code by default, and the release's behaviour
offered as an option where the project's own choice is kept (docs/training.md, "Differences from
the release"; issue 12). Everything runs on tiny random models."""

from __future__ import annotations

import types

import pytest

from msdiffusion.resampler import ResamplerConfig, released_grounding_hidden_dim

# --- 1. grounding MLP width of new adapters --------------------------------------------------------


@pytest.mark.parametrize("image_width", [1664, 1280, 1024])  # ViT-bigG, ViT-H, ViT-L
def test_new_adapter_grounding_width_follows_the_release_rule_not_the_encoder(image_width):
    from msdiffusion.train import TrainConfig
    from msdiffusion.train.models import resampler_config

    unet = types.SimpleNamespace(config=types.SimpleNamespace(cross_attention_dim=2048))
    config = TrainConfig(base="b", image_encoder="e", manifest="m")
    rc = resampler_config(config, unet, image_width=image_width, phrase_width=768)
    assert rc.grounding_hidden_dim == 2 * (768 + 8 * 2 * 4) == 1664  # the release's latent_proj width
    assert rc.embedding_dim == image_width
    # an explicit override is still honoured
    config = TrainConfig(base="b", image_encoder="e", manifest="m", resampler={"grounding_hidden_dim": 96})
    assert resampler_config(config, unet, image_width=image_width, phrase_width=768).grounding_hidden_dim == 96


def test_tiny_adapter_uses_the_release_rule_and_loading_reads_the_width_from_the_checkpoint(tmp_path):
    import torch

    from msdiffusion.adapter import initial_checkpoint, load_checkpoint
    from msdiffusion.tiny import TINY_RESAMPLER, tiny_sdxl_components

    assert (
        TINY_RESAMPLER.grounding_hidden_dim == released_grounding_hidden_dim(TINY_RESAMPLER.phrase_dim) == 2 * (32 + 64)
    )
    unet = tiny_sdxl_components(tmp_path / "tok")["unet"]
    # a checkpoint of another width (e.g. trained before this rule) still loads with its own width
    odd = ResamplerConfig(**{**TINY_RESAMPLER.to_dict(), "grounding_hidden_dim": 40})
    torch.manual_seed(0)
    path = initial_checkpoint(unet, odd).save(tmp_path / "ms_adapter.bin")
    loaded = load_checkpoint(path)
    assert loaded.resampler_config.grounding_hidden_dim == 40
    assert loaded.image_proj["latent_proj.0.weight"].shape == (40, 32 + 64)


# --- 3. the release's negative prompt by default ----------------------------------------------------

RELEASE_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


class _RecordingPipe:
    """Stands in for the pipeline in `run_job`: records each call's arguments, returns blank images."""

    _execution_device = "cpu"
    controlnet = None  # a ControlNet job's test sets one

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, **kwargs):
        import PIL.Image

        self.calls.append(kwargs)
        count = kwargs.get("num_images_per_prompt") or 1
        image = PIL.Image.new("RGB", (kwargs["width"], kwargs["height"]))
        return types.SimpleNamespace(images=[image] * count, auto_layout_maps=None)


@pytest.fixture(autouse=True)
def _recording_pipes_serve_every_task(monkeypatch):
    """`run_job` picks the pipeline of the job's task (`pipeline_for_task`); a recording pipe stands in for all."""
    import msdiffusion.loading as loading

    real = loading.pipeline_for_task
    monkeypatch.setattr(
        loading, "pipeline_for_task", lambda pipe, task: pipe if isinstance(pipe, _RecordingPipe) else real(pipe, task)
    )


def _job_dict(tmp_path, **extra):
    import PIL.Image

    PIL.Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "dog.png")
    return {
        "base": "b",
        "adapter": "a",
        "prompt": "a dog",
        "size": [64, 64],
        "seed": 3,
        "output": str(tmp_path / "out"),
        "preview": False,
        "subjects": [{"image": str(tmp_path / "dog.png"), "phrase": "dog", "box": [0, 0, 1, 1]}],
        **extra,
    }


def test_jobs_and_the_cli_default_to_the_release_negative_prompt(tmp_path, capsys):
    from msdiffusion.app.cli import build_parser
    from msdiffusion.app.commands import _flag_overrides
    from msdiffusion.app.jobs import job_from_dict, run_job
    from msdiffusion.release import RELEASE_NEGATIVE_PROMPT

    assert RELEASE_NEGATIVE_PROMPT == RELEASE_NEGATIVE
    job = job_from_dict(_job_dict(tmp_path))
    assert job.negative_prompt == RELEASE_NEGATIVE
    pipe = _RecordingPipe()
    run_job(job, pipe=pipe, progress=False, log=lambda *_: None)
    assert pipe.calls[0]["negative_prompt"] == RELEASE_NEGATIVE
    # "" and null both mean no negative prompt (diffusers' None)
    for value in ("", None):
        assert job_from_dict(_job_dict(tmp_path, negative_prompt=value)).negative_prompt is None
    args = build_parser().parse_args(["generate", "--negative-prompt", ""])
    assert job_from_dict({**_job_dict(tmp_path), **_flag_overrides(args)}).negative_prompt is None
    # --help shows the default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "monochrome, lowres, bad" in " ".join(capsys.readouterr().out.split())


def test_the_python_pipeline_keeps_diffusers_none():
    import inspect

    from msdiffusion import MSDiffusionXLPipeline

    parameters = inspect.signature(MSDiffusionXLPipeline.__call__).parameters
    assert "negative_prompt" not in parameters or parameters["negative_prompt"].default is None


def test_training_validation_defaults_to_the_release_negative_prompt(tmp_path):
    import PIL.Image

    from msdiffusion.train import TrainConfig
    from msdiffusion.train.validation import validation_entries, validation_settings

    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "r.png")
    subject = {"image": str(tmp_path / "r.png"), "phrase": "dog", "box": [0, 0, 1, 1]}
    entries = [
        {"prompt": "a dog", "subjects": [subject]},
        {"prompt": "a dog", "subjects": [subject], "negative_prompt": "blurry"},
        {"prompt": "a dog", "subjects": [subject], "negative_prompt": None},
    ]
    config = TrainConfig(base="b", image_encoder="e", manifest="m", validation=entries)
    assert validation_settings(config).negative_prompt == RELEASE_NEGATIVE
    got = [entry.negative_prompt for entry in validation_entries(config, dataset=None)]
    assert got == [RELEASE_NEGATIVE, "blurry", None]
    config = TrainConfig(
        base="b", image_encoder="e", manifest="m", validation=entries[:1], validation_settings={"negative_prompt": None}
    )
    assert validation_entries(config, dataset=None)[0].negative_prompt is None


# --- 2. masked references: black, as the release's multiplication by the mask -------------------------


def test_masked_references_are_black_by_default_like_multiplying_by_the_mask(tmp_path):
    import json

    import numpy as np
    import PIL.Image

    from msdiffusion.app.cli import build_parser
    from msdiffusion.data.dataset import MSDiffusionDataset
    from msdiffusion.train import TrainConfig
    from msdiffusion.train.data import build_dataset

    rng = np.random.default_rng(0)
    reference = PIL.Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    reference.save(tmp_path / "ref.png")
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[4:20, 6:18] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    subject = {"phrase": "dog", "box": [0, 0, 1, 1], "reference": {"image": "ref.png", "mask": "mask.png"}}
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"image": "ref.png", "caption": "a dog", "subjects": [subject]}) + "\n"
    )

    def background(dataset):
        return np.asarray(dataset.reference_image(dataset.sample(0).subjects[0].reference, {}, "here", 0))

    released = np.asarray(reference) * (mask[..., None] // 255)  # the release: image times its 0/1 mask
    config = TrainConfig(base="b", image_encoder="e", manifest=str(tmp_path / "manifest.jsonl"), resolution=32)
    assert config.mask_color == "black"
    assert np.array_equal(background(build_dataset(config)), released)
    assert np.array_equal(background(MSDiffusionDataset(config.manifest, resolution=32)), released)
    white = background(build_dataset(TrainConfig(**{**config.to_dict(), "mask_color": "white"})))
    assert (white[mask == 0] == 255).all() and np.array_equal(white[mask > 0], np.asarray(reference)[mask > 0])
    args = build_parser().parse_args(["data", "cache", "m.jsonl", "--out", "c", "--base", "b", "--image-encoder", "e"])
    assert args.mask_color == "black"


# --- 5. repeated phrases: token matching by default, the release's positions as an option ----------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from msdiffusion.tiny import tiny_tokenizers

    return tiny_tokenizers(tmp_path_factory.mktemp("tokenizer"))[0]


def test_release_phrase_positions_reproduce_the_released_word_matching(tokenizer):
    from msdiffusion.layout import phrase_token_positions, release_phrase_token_positions

    prompt = "a cat, a cat, and a cat"
    assert phrase_token_positions(tokenizer, prompt, ["cat"] * 3) == [[2], [5], [9]]  # where the tokens are
    assert phrase_token_positions(tokenizer, prompt, ["cat"] * 3, "release") == [[2], [3], [5]]  # the release
    # single occurrences agree; the release is case-sensitive, matches "-word" inside a word and strips one
    # trailing punctuation mark of the last matched word only
    assert release_phrase_token_positions(tokenizer, "a dog and a cat.", ["dog", "cat"]) == [[2], [5]]
    assert release_phrase_token_positions(tokenizer, "a Dog", ["dog"]) == [[]]
    assert phrase_token_positions(tokenizer, "a Dog", ["dog"]) == [[2]]
    assert release_phrase_token_positions(tokenizer, "a teddy-bear", ["bear"]) == [[2, 3, 4]]
    assert release_phrase_token_positions(tokenizer, "a red dog, on the beach", ["red dog"]) == [[2, 3]]
    assert release_phrase_token_positions(tokenizer, "a dog", ["cat", ""]) == [[], []]
    with pytest.raises(ValueError, match="phrase_matching"):
        phrase_token_positions(tokenizer, prompt, ["cat"], "words")


def test_release_positions_differ_on_1014_msbench_prompts_with_the_sdxl_tokenizer(shared_dir):
    from transformers import CLIPTokenizer

    from msdiffusion.bench.definitions import load_benchmark
    from msdiffusion.layout import phrase_token_positions

    sdxl = CLIPTokenizer.from_pretrained(shared_dir / "sdxl-base", subfolder="tokenizer")
    samples = load_benchmark("msbench").samples
    differing = sum(
        phrase_token_positions(sdxl, s.prompt, phrases) != phrase_token_positions(sdxl, s.prompt, phrases, "release")
        for s in samples
        for phrases in [[subject.phrase for subject in s.subjects]]
    )
    assert (differing, len(samples)) == (1014, 4488)


def test_phrase_matching_reaches_the_layout_from_the_pipeline_jobs_and_bench(tmp_path, tokenizer):
    from msdiffusion.app.cli import build_parser
    from msdiffusion.app.commands import _flag_overrides
    from msdiffusion.app.jobs import JobError, job_from_dict, run_job
    from msdiffusion.bench.runner import BenchSettings, check_run_config
    from msdiffusion.subjects import Subject
    from msdiffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0, work_dir=tmp_path / "tiny")
    subjects = [[Subject([None], "cat", (0.0, 0.0, 0.5, 0.5)), Subject([None], "cat", (0.5, 0.5, 1.0, 1.0))]]
    args = (["a cat and a cat"], subjects, 64, 64, 0.6, 0.5, 5)
    assert pipe.subject_layout(*args).phrase_positions == [[[2], [5]]]
    # the release skips the first "cat" without counting it: the second lands on "a" (4), not "cat" (5)
    assert pipe.subject_layout(*args, phrase_matching="release").phrase_positions == [[[2], [4]]]

    recorder = _RecordingPipe()
    job = job_from_dict(_job_dict(tmp_path, phrase_matching="release"))
    run_job(job, pipe=recorder, progress=False, log=lambda *_: None)
    assert recorder.calls[0]["phrase_matching"] == "release"
    assert job_from_dict(_job_dict(tmp_path)).phrase_matching == "tokens"
    with pytest.raises(JobError, match="phrase_matching"):
        job_from_dict(_job_dict(tmp_path, phrase_matching="words"))
    flags = build_parser().parse_args(["generate", "--phrase-matching", "release"])
    assert _flag_overrides(flags)["phrase_matching"] == "release"

    bench = build_parser().parse_args(
        [
            "bench",
            "run",
            "--photos",
            "i",
            "--output",
            "o",
            "--base",
            "b",
            "--adapter",
            "a",
            "--image-encoder",
            "e",
            "--phrase-matching",
            "release",
        ]
    )
    assert bench.phrase_matching == "release"
    # a run directory made before the setting existed resumes with the default
    settings = BenchSettings(base="b", adapter="a", image_encoder="e")
    old = {k: v for k, v in settings.to_dict().items() if k != "phrase_matching"}
    (tmp_path / "run_config.json").write_text(__import__("json").dumps({"benchmark": "msbench", "settings": old}))
    check_run_config(tmp_path, "msbench", settings, tmp_path)
    with pytest.raises(ValueError, match="phrase_matching"):
        check_run_config(
            tmp_path,
            "msbench",
            BenchSettings(base="b", adapter="a", image_encoder="e", phrase_matching="release"),
            tmp_path,
        )


# --- 7. seeds: a CPU generator per image by default, the release's batch draw as an option -----------


def test_release_seed_mode_draws_the_batch_from_one_generator_like_the_release(tmp_path):
    import json

    import numpy as np
    import PIL.Image
    import torch

    from msdiffusion.app.cli import build_parser
    from msdiffusion.app.commands import _flag_overrides
    from msdiffusion.app.jobs import PNG_METADATA_KEY, JobError, job_from_dict, run_job
    from msdiffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0, work_dir=tmp_path / "tiny")
    common = dict(images=2, steps=2, seed=11, negative_prompt=None)

    def run(mode):
        job = job_from_dict(_job_dict(tmp_path, seed_mode=mode, output=str(tmp_path / mode), **common))
        paths = [p for p in run_job(job, pipe=pipe, progress=False, log=lambda *_: None) if p.suffix == ".png"]
        return paths, [np.asarray(PIL.Image.open(p)) for p in paths]

    paths, release = run("release")
    # the release: MSAdapter.generate(num_samples=2, seed=11) -> one Generator(device).manual_seed(11) for the batch
    direct = pipe(
        prompt="a dog",
        negative_prompt=None,
        subject_images=[PIL.Image.open(tmp_path / "dog.png")],
        subject_phrases=["dog"],
        subject_boxes=[[0, 0, 1, 1]],
        num_inference_steps=2,
        height=64,
        width=64,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="pil",
    ).images
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(release, direct))
    recorded = json.loads(PIL.Image.open(paths[1]).text[PNG_METADATA_KEY])
    assert (recorded["seed"], recorded["images"], recorded["seed_mode"]) == (
        11,
        2,
        "release",
    )  # --from redoes the batch

    _, per_image = run("per-image")

    def levels(a, b):  # largest difference in 8-bit levels
        return int(np.abs(a.astype(int) - b.astype(int)).max())

    # The first image's noise is the same draw on the CPU; computed in a batch of 1 instead of 2, its
    # floats may round differently, which can move a pixel by one level.
    assert levels(per_image[0], release[0]) <= 1
    assert levels(per_image[1], release[1]) > 8  # later ones are not: seed + 1 vs the batch's continuation

    assert job_from_dict(_job_dict(tmp_path)).seed_mode == "per-image"
    with pytest.raises(JobError, match="seed_mode"):
        job_from_dict(_job_dict(tmp_path, seed_mode="batch"))
    assert _flag_overrides(build_parser().parse_args(["generate", "--seed-mode", "release"]))["seed_mode"] == "release"


# --- 4. ControlNet: text tokens only by default, the released script's full attention as an option ---


def test_controlnet_image_tokens_reproduces_the_released_script_and_text_only_stays_default(tmp_path):
    import numpy as np
    import PIL.Image
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from msdiffusion.app.cli import build_parser
    from msdiffusion.app.commands import _flag_overrides
    from msdiffusion.app.jobs import job_from_dict, run_job
    from msdiffusion.attention import TextOnlyAttnProcessor
    from msdiffusion.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0, controlnet=True, work_dir=tmp_path / "tiny")
    name = next(n for n in pipe.controlnet.attn_processors if n.endswith("attn2.processor"))
    layer = pipe.controlnet.get_submodule(name.removesuffix(".processor"))
    seen = []
    layer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((args[0], kwargs["encoder_hidden_states"], out)), with_kwargs=True
    )
    image = PIL.Image.new("RGB", (40, 40), (120, 30, 200))
    depth = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).convert("RGB")
    args = dict(
        prompt="a dog and a cat",
        image=depth,
        subject_images=[image, image],
        subject_phrases=["dog", "cat"],
        subject_boxes=[[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1, 0.8]],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    )

    def run(**extra):
        seen.clear()
        return pipe(generator=torch.Generator().manual_seed(0), **args, **extra).images

    plain = AttnProcessor2_0()
    released = run(controlnet_image_tokens=True)
    hidden, states, out = seen[0]
    assert states.shape[1] == 77 + 4 + 2 * 16  # the ControlNet is fed text, dummy and subject tokens
    torch.testing.assert_close(out, plain(layer, hidden, states))  # and attends over all of them
    default = run()
    assert all(isinstance(p, TextOnlyAttnProcessor) for n, p in pipe.controlnet.attn_processors.items() if "attn2" in n)
    hidden, states, out = seen[0]
    torch.testing.assert_close(out, plain(layer, hidden, states[:, :77]))  # the text tokens only
    assert not np.allclose(released, default, atol=1e-4)

    # job files and msdiff generate
    depth.save(tmp_path / "depth.png")
    job = job_from_dict(
        _job_dict(tmp_path, controlnet={"model": "cn", "image": str(tmp_path / "depth.png"), "image_tokens": True})
    )
    recorder = _RecordingPipe()
    recorder.controlnet = pipe.controlnet
    run_job(job, pipe=recorder, progress=False, log=lambda *_: None)
    assert recorder.calls[0]["controlnet_image_tokens"] is True
    flags = build_parser().parse_args(
        ["generate", "--controlnet", "cn", "--control-image", "d.png", "--controlnet-image-tokens"]
    )
    assert _flag_overrides(flags)["controlnet"] == {"model": "cn", "image": "d.png", "image_tokens": True}


# --- 8. benchmark metrics: DreamBooth's protocol, DINO's resize-256 / centre-crop-224 -----------------


def test_scoring_defaults_follow_dreambooths_protocol(tmp_path):
    from msdiffusion.app.cli import build_parser
    from msdiffusion.bench.scoring import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, ScoringConfig

    assert DEFAULT_CLIP_MODEL == "openai/clip-vit-base-patch32"  # CLIP ViT-B/32
    assert DEFAULT_DINO_MODEL == "facebook/dino-vits16"  # DINO ViT-S/16
    assert ScoringConfig().dino_preprocessing == "resize-crop"
    # The flags default to None (a world run refuses them when given); unset, the standard scorer uses these.
    from msdiffusion.app.bench_commands import _standard_scorer

    args = build_parser().parse_args(["bench", "score", "--output", str(tmp_path)])
    requested, _ = _standard_scorer(args, tmp_path)
    assert (requested["clip_model"], requested["dino_model"], requested["dino_preprocessing"]) == (
        DEFAULT_CLIP_MODEL,
        DEFAULT_DINO_MODEL,
        "resize-crop",
    )


def _red_square_on_blue(width: int, height: int):
    import PIL.Image

    image = PIL.Image.new("RGB", (width, height), (0, 0, 255))
    side = min(width, height)
    image.paste((255, 0, 0), ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2))
    return image


def test_dino_keeps_the_aspect_ratio_and_crops_the_centre(tmp_path):
    import numpy as np
    import torch
    from test_bench_tiny_models import save_tiny_dino

    from msdiffusion.bench.scoring import DinoEmbedder, resize_and_centre_crop

    wide = _red_square_on_blue(400, 200)  # the centre square is red, the sides blue
    cropped = np.asarray(resize_and_centre_crop(wide))
    assert cropped.shape == (224, 224, 3)
    assert (cropped[..., 0] > 250).all() and (cropped[..., 2] < 5).all()  # 400x200 -> 512x256 -> x 144..368: red only
    tall = np.asarray(resize_and_centre_crop(_red_square_on_blue(200, 300)))
    assert tall.shape == (224, 224, 3) and (tall[..., 0] > 250).all()
    assert np.asarray(resize_and_centre_crop(_red_square_on_blue(256, 256)))[0, 0].tolist() == [255, 0, 0]

    folder = save_tiny_dino(tmp_path / "dino")
    crop = DinoEmbedder(str(folder), "cpu")
    squash = DinoEmbedder(str(folder), "cpu", preprocessing="squash")
    size = crop.model.config.image_size  # the tiny model's input: the crop keeps DINO's 256 : 224 ratio
    mean, std = np.asarray(crop.processor.image_mean), np.asarray(crop.processor.image_std)
    expected = (np.asarray(resize_and_centre_crop(wide, size * 256 // 224, size), dtype=np.float32) / 255 - mean) / std
    torch.testing.assert_close(crop.pixels([wide])[0], torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1))
    squashed = squash.pixels([wide])[0]
    assert (
        squashed.shape == (3, size, size) and squashed[2, :, 0].mean() > squashed[2, :, size // 2].mean()
    )  # blue sides kept
    square = _red_square_on_blue(200, 200)
    assert float(crop.images([wide]) @ crop.images([square]).T) > float(
        squash.images([wide]) @ squash.images([square]).T
    )


# --- 6. training data defaults: documented, with the release's behaviour as settings -----------------


def test_training_docs_list_every_difference_from_the_release():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert "## Differences from the release" in text
    section = text.split("## Differences from the release", 1)[1]
    for words in (
        "grounding MLP width",
        "mask_color",
        "validation_settings",
        "crop: center",
        "min_visible_fraction: 0",
        "bilinear",
        "teddy-bear",
        "mixed_precision: no",
        "controlnet_image_tokens",
        "phrase_matching",
        "seed_mode",
        "dino-preprocessing",
        "opaque_rgb",
    ):
        assert words in section, words
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "docs/training.md#differences-from-the-release" in readme


def test_centre_crop_and_no_visibility_threshold_give_the_release_crop_and_clamped_boxes(tmp_path):
    import json

    import PIL.Image
    import torch

    from msdiffusion.train import TrainConfig
    from msdiffusion.train.data import build_dataset

    PIL.Image.new("RGB", (200, 100), "red").save(tmp_path / "wide.png")
    boxes = [[0.25, 0.1, 0.5, 0.9], [0.7, 0.2, 0.9, 0.8], [0.0, 0.0, 0.2, 1.0]]  # inside, 25 % visible, outside
    subjects = [{"phrase": f"s{i}", "box": box, "reference": "wide.png"} for i, box in enumerate(boxes)]
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "wide.png", "caption": "s0 s1 s2", "subjects": subjects}) + "\n"
    )
    config = TrainConfig(
        base="b",
        image_encoder="e",
        manifest=str(tmp_path / "m.jsonl"),
        resolution=64,
        crop="center",
        min_visible_fraction=0.0,
    )
    item = build_dataset(config)[0]
    # the release: resize the short side to 64 (200x100 -> 128x64), centre crop, boxes * scale - offset, clamped
    top, left = (64 - 64) // 2, (128 - 64) // 2
    assert item["crop_top_left"] == (top, left)
    released = (torch.tensor(boxes) * torch.tensor([128, 64, 128, 64]) - torch.tensor([left, top, left, top])).clamp(
        0, 64
    ) / 64
    assert item["subject_phrases"][:2] == ["s0", "s1"]  # the release also keeps s2, as an empty box covering no cell
    torch.testing.assert_close(item["subject_boxes"][:2], released[:2])
    assert released[2, 2] - released[2, 0] == 0
    default = build_dataset(TrainConfig(**{**config.to_dict(), "min_visible_fraction": 0.3}))[0]
    assert default["subject_phrases"][:2] == ["s0", ""]  # 25 % visible is dropped by default
