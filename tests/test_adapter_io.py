import json

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion import AdapterMismatchError, MSDiffusionXLPipeline, load_checkpoint
from msdiffusion.adapter import MSAdapterCheckpoint, cross_attention_layers
from msdiffusion.resampler import ResamplerConfig
from msdiffusion.tiny import TINY_RESAMPLER, save_tiny_models, tiny_pipeline

IMG = PIL.Image.new("RGB", (40, 40), (120, 30, 200))
ARGS = dict(
    prompt="a dog on the grass",
    subject_images=[IMG],
    subject_phrases=["dog"],
    subject_boxes=[[0.1, 0.2, 0.7, 0.9]],
    num_inference_steps=2,
    height=64,
    width=96,
    output_type="np",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


def same_tensors(a: MSAdapterCheckpoint, b: MSAdapterCheckpoint):
    sa, sb = a.released_state(), b.released_state()
    for section in ("image_proj", "ms_adapter"):
        assert sa[section].keys() == sb[section].keys()
        for key in sa[section]:
            assert torch.equal(sa[section][key], sb[section][key]), key
    assert torch.equal(sa["dummy_image_tokens"], sb["dummy_image_tokens"])


def test_released_and_project_formats_round_trip(models, tmp_path):
    released = load_checkpoint(models["released_adapter"])
    project = load_checkpoint(models["adapter"])
    same_tensors(released, project)
    assert released.resampler_config == project.resampler_config == TINY_RESAMPLER  # inferred == recorded
    config = json.loads((models["adapter"] / "ms_adapter_config.json").read_text())
    assert config["format"] == "msdiffusion-adapter" and config["resampler"]["dim"] == 128
    # released keys are exactly {image_proj, ms_adapter, dummy_image_tokens}
    raw = torch.load(models["released_adapter"], weights_only=True)
    assert set(raw) == {"image_proj", "ms_adapter", "dummy_image_tokens"}
    again = load_checkpoint(project.save(tmp_path / "again.bin"))
    same_tensors(again, released)
    # a folder holding ms_adapter.bin, and weight_name= for another file name
    folder = tmp_path / "folder"
    released.save(folder / "ms_adapter.bin")
    same_tensors(load_checkpoint(folder), released)
    released.save(folder / "other.bin")
    same_tensors(load_checkpoint(folder, weight_name="other.bin"), released)


def test_pipeline_loads_every_format_and_gives_the_same_images(models):
    reference = tiny_pipeline(seed=0)(generator=torch.Generator().manual_seed(0), **ARGS).images
    for adapter in (models["adapter"], models["released_adapter"]):
        pipe = MSDiffusionXLPipeline.from_pretrained(models["base"])
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ms_adapter(adapter, image_encoder=models["image_encoder"])
        images = pipe(generator=torch.Generator().manual_seed(0), **ARGS).images
        np.testing.assert_allclose(images, reference, atol=1e-5)


def test_save_from_pipeline_and_reload(models, tmp_path):
    pipe = tiny_pipeline(seed=0)
    pipe.save_ms_adapter(tmp_path / "saved")
    pipe.save_ms_adapter(tmp_path / "saved.bin")
    same_tensors(load_checkpoint(tmp_path / "saved"), load_checkpoint(models["adapter"]))
    same_tensors(load_checkpoint(tmp_path / "saved.bin"), load_checkpoint(models["adapter"]))
    with pytest.raises(ValueError, match="save_ms_adapter"):
        pipe.save_pretrained(tmp_path / "pipe")
    pipe.unload_ms_adapter()
    pipe.save_pretrained(tmp_path / "pipe")  # fine once unloaded
    with pytest.raises(ValueError, match="No MS-Diffusion adapter"):
        pipe.save_ms_adapter(tmp_path / "nothing")


def test_mismatched_checkpoint_is_refused_before_anything_changes(models):
    pipe = MSDiffusionXLPipeline.from_pretrained(models["base"])
    processors_before = dict(pipe.unet.attn_processors)
    checkpoint = load_checkpoint(models["released_adapter"])
    first = min(checkpoint.attention)
    checkpoint.attention[first]["to_k_ip.weight"] = torch.zeros(3, 64)
    with pytest.raises(
        AdapterMismatchError, match=rf"key '{first}.to_k_ip.weight' has shape \(3, 64\), expected \(\d+, 64\)"
    ):
        pipe.load_ms_adapter(checkpoint, image_encoder=models["image_encoder"])
    assert dict(pipe.unet.attn_processors) == processors_before and pipe.ms_image_projection is None

    checkpoint = load_checkpoint(models["released_adapter"])
    del checkpoint.attention[first]
    with pytest.raises(AdapterMismatchError, match=f"missing key '{first}.to_k_ip.weight'"):
        pipe.load_ms_adapter(checkpoint, image_encoder=models["image_encoder"])
    checkpoint = load_checkpoint(models["released_adapter"])
    checkpoint.attention[999] = checkpoint.attention[first]
    with pytest.raises(AdapterMismatchError, match="unexpected key '999.to_k_ip.weight'"):
        pipe.load_ms_adapter(checkpoint, image_encoder=models["image_encoder"])


def test_wrong_encoders_are_refused(models):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe = MSDiffusionXLPipeline.from_pretrained(models["base"])
    wide = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            image_size=224,
            patch_size=14,
        )
    )
    with pytest.raises(AdapterMismatchError, match="image encoder's hidden size is 48"):
        pipe.load_ms_adapter(models["adapter"], image_encoder=wide)
    with pytest.raises(ValueError, match="No image encoder"):
        pipe.load_ms_adapter(models["adapter"])


def test_not_a_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.bin")
    with pytest.raises(AdapterMismatchError, match="no 'image_proj' section"):
        load_checkpoint(tmp_path / "x.bin")
    (tmp_path / "y.bin").write_text("garbage")
    with pytest.raises(AdapterMismatchError, match="Cannot read"):
        load_checkpoint(tmp_path / "y.bin")
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_checkpoint(tmp_path / "missing.bin")


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(OSError, match="offline or no network"):
        load_checkpoint("doge1516/MS-Diffusion")


def test_image_encoder_preprocessing_from_folder_or_standard(models, tmp_path):
    import shutil

    from transformers import CLIPImageProcessor

    pipe = MSDiffusionXLPipeline.from_pretrained(models["base"])
    pipe.load_ms_adapter(models["adapter"], image_encoder=models["image_encoder"])
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}  # CLIP standard
    folder = tmp_path / "encoder"
    shutil.copytree(models["image_encoder"], folder)
    CLIPImageProcessor(crop_size=196, size={"shortest_edge": 196}).save_pretrained(folder)
    pipe.load_ms_adapter(models["adapter"], image_encoder=folder)
    assert pipe.feature_extractor.crop_size == {"height": 196, "width": 196}


def test_released_key_names_and_shapes(shared_dir):
    """The project's adapter for SDXL has exactly the released checkpoint's keys, shapes and layer mapping."""
    from diffusers import UNet2DConditionModel

    from msdiffusion.adapter import MSImageProjection, expected_attention_shapes

    rows = [
        line.split("\t")
        for line in (shared_dir / "spec/ms_adapter_keys.tsv").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    released = {}
    modules = {}
    for section, key, shape, *module in rows:
        name = f"{section}.{key}" if key else section
        released[name] = tuple(int(d) for d in shape.split("x"))
        if module and module[0].strip():
            modules[int(key.split(".")[0])] = module[0].strip()

    config = json.loads((shared_dir / "sdxl-base/unet/config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        projection = MSImageProjection(ResamplerConfig().to_dict(), num_dummy_tokens=4)
    ours = {k: tuple(v.shape) for k, v in projection.state_dict().items()}
    ours.update({f"ms_adapter.{k}": v for k, v in expected_attention_shapes(unet).items()})
    assert ours == released
    assert cross_attention_layers(unet) == modules
    assert (
        ResamplerConfig.from_state_dict(
            {
                k.removeprefix("image_proj."): torch.empty(s, device="meta")
                for k, s in released.items()
                if k.startswith("image_proj.")
            }
        )
        == ResamplerConfig()
    )
