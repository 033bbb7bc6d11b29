"""Tiny random OWLv2 (detector) and SAM (segmenter) folders for the data-build and training tests."""

from __future__ import annotations

from pathlib import Path


def save_tiny_detector_and_segmenter(folder: Path) -> dict[str, Path]:
    """Random OWLv2 and SAM models small enough for CPU tests, saved with PIL-backend processors."""
    import string

    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
        SamConfig,
        SamImageProcessorPil,
        SamModel,
        SamProcessor,
    )

    # Characters as tokens; start/end last, as OWL pools at the highest id.
    vocab = {"!": 0}
    for c in string.ascii_lowercase + string.digits + ".":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    size = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    owl = Owlv2ForObjectDetection(
        Owlv2Config(
            text_config=dict(
                vocab_size=size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=size - 2,
                eos_token_id=size - 1,
                pad_token_id=size - 1,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=64,
                patch_size=16,
            ),
            projection_dim=32,
        )
    )
    # A random box head predicts degenerate boxes; zeroed, each patch predicts its own cell.
    torch.nn.init.zeros_(owl.box_head.dense2.weight)
    torch.nn.init.zeros_(owl.box_head.dense2.bias)
    owl.save_pretrained(folder / "owlv2")
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 64, "width": 64}), tokenizer).save_pretrained(
        folder / "owlv2"
    )
    sam = SamModel(
        SamConfig(
            vision_config=dict(
                hidden_size=32,
                output_channels=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=64,
                patch_size=8,
                window_size=4,
                global_attn_indexes=[1],
                num_pos_feats=8,
                mlp_dim=64,
            ),
            prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
            mask_decoder_config=dict(
                hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
            ),
        )
    )
    sam.save_pretrained(folder / "sam")
    SamProcessor(SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})).save_pretrained(
        folder / "sam"
    )
    return {"detector": folder / "owlv2", "segmenter": folder / "sam"}
