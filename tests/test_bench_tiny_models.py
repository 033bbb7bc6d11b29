"""Tiny random scoring models (CLIP, DINO ViT, OWLv2, Grounding DINO) saved as hub-style folders.

Other bench tests import `tiny_scoring_models`; the tests here check that each folder loads through
the real loading code (`msdiffusion.bench.scoring`, the detector of `msdiffusion.data.detection`) and
produces outputs of the expected form.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

_CHARS = list(string.ascii_lowercase) + list(string.digits) + list(",.-'!")
_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
)


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    # character-level BPE vocabulary: no merges, every lowercase word splits into known characters
    # the special tokens come last, as in CLIP's real vocabulary: OWL treats a query starting with id 0 as padding
    vocab: dict[str, int] = {}
    for token in _CHARS + [c + "</w>" for c in _CHARS] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_text_config(tokenizer, max_positions: int) -> dict:
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return dict(
        _TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def save_tiny_clip(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(77)
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer, 77),
        vision_config=_VISION,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return Path(directory)


def save_tiny_dino(directory: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(**_VISION), add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return Path(directory)


def save_tiny_owlv2(directory: Path) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(2)
    tokenizer = _clip_tokenizer(16)  # OWL pads every query to 16 tokens
    config = Owlv2Config(
        text_config=_clip_text_config(tokenizer, 16),
        vision_config=_VISION,
        projection_dim=32,  # OWL's class head compares text projections with text-width box embeddings
    )
    Owlv2ForObjectDetection(config).save_pretrained(directory)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return Path(directory)


def save_tiny_grounding_dino(directory: Path) -> Path:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(3)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _CHARS + ["##" + c for c in _CHARS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 1],
            window_size=2,
            out_features=["stage1", "stage2"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=10,
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
        use_timm_backbone=False,
        backbone=None,
        use_pretrained_backbone=False,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(directory)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 32})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def tiny_scoring_models(root: Path) -> dict[str, Path]:
    """Save (once per root) and return the folders of the tiny scoring models."""
    root = Path(root)
    builders = {
        "clip": save_tiny_clip,
        "dino": save_tiny_dino,
        "owlv2": save_tiny_owlv2,
        "grounding_dino": save_tiny_grounding_dino,
    }
    paths = {}
    for name, build in builders.items():
        paths[name] = root / name
        if not (paths[name] / "config.json").is_file():
            build(paths[name])
    return paths


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def scoring_models(tmp_path_factory) -> dict[str, Path]:
    return tiny_scoring_models(tmp_path_factory.mktemp("scoring_models"))


def test_tiny_embedders_load_and_normalise(scoring_models):
    from msdiffusion.bench.scoring import ClipEmbedder, DinoEmbedder

    clip = ClipEmbedder(str(scoring_models["clip"]), "cpu", batch_size=2)
    images = [noise_image(s) for s in range(3)]  # 3 images with batch size 2: two batches
    image_embeds, text_embeds = clip.images(images), clip.texts(["a cat", "a t-shirt and jeans", "x"])
    dino = DinoEmbedder(str(scoring_models["dino"]), "cpu").images(images)
    for embeds, width in ((image_embeds, 16), (text_embeds, 16), (dino, 32)):
        assert embeds.shape == (3, width)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    # batching must not change results
    torch.testing.assert_close(clip.images(images[2:]), image_embeds[2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["owlv2", "grounding_dino"])
def test_tiny_detectors_return_boxes_in_unit_square(scoring_models, family):
    from msdiffusion.data.detection import OpenVocabularyDetector

    detector = OpenVocabularyDetector(str(scoring_models[family]), "cpu", threshold=0.0, batch_size=2)
    images = [noise_image(0, (96, 64)), noise_image(1, (64, 64)), noise_image(2, (64, 80))]
    queries = [["cat", "dog"], ["stuffed animal"], []]
    results = detector(images, queries)
    assert results[1] and results[2] == [], "threshold 0 must keep detections"
    assert all({d.phrase for d in r} <= set(q) for r, q in zip(results, queries))
    for detection in (d for r in results for d in r):
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    if family == "owlv2":
        # Batched with an image of two queries, the one-query image had a padding query; it changes nothing.
        alone = detector(images[1:2], queries[1:2])[0]
        assert [(*d.box, d.score) for d in alone] == [pytest.approx((*d.box, d.score), abs=1e-5) for d in results[1]]
