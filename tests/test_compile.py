"""`torch.compile` of a UNet with the adapter attached: one graph, no graph breaks, no recompiles.

Dynamo's guards decide recompilation before any backend runs, so the "eager" backend checks the
same thing as inductor at a fraction of the time.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from msdiffusion.tiny import tiny_pipeline

PROMPT = "a dog and a cat on the beach"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(4)]


def generate(pipe, boxes, images, **extra):
    return pipe(
        prompt=PROMPT,
        num_inference_steps=3,
        height=128,
        width=128,
        output_type="latent",
        subject_images=images,
        subject_phrases=["dog", "cat"],
        subject_boxes=boxes,
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images


@pytest.mark.slow
def test_compiled_unet_does_not_recompile_across_generations(images):
    import torch._dynamo
    from torch._dynamo.utils import counters

    first = dict(boxes=[[0.0, 0.25, 0.45, 0.75], [0.5, 0.2, 1.0, 0.8]], images=images[:2], ms_scale=0.6)
    others = [
        dict(boxes=[[0.1, 0.0, 0.6, 0.5], [0.3, 0.4, 0.9, 1.0]], images=images[2:], ms_scale=0.4),
        dict(boxes=[[0.1, 0.0, 0.6, 0.5], [0.3, 0.4, 0.9, 1.0]], images=images[2:], subject_scales=[0.9, 0.2]),
    ]
    auto_first = dict(first, mask_threshold=0.5, start_step=2)
    auto_other = dict(others[0], mask_threshold=0.3, start_step=3)

    pipe = tiny_pipeline(seed=0)
    expected = [generate(pipe, **args) for args in [*others, auto_other]]

    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)  # fullgraph: a graph break fails
    generate(pipe, **first)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1  # every step of the generation runs the same graph
    for args, want in zip(others, expected):
        np.testing.assert_allclose(generate(pipe, **args), want, atol=1e-6)  # new tensors are used, not baked in
    assert counters["stats"]["unique_graphs"] == graphs

    # Auto layout: one more graph, the same at every step (its running means are made on activation).
    generate(pipe, **auto_first)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    graphs = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(generate(pipe, **auto_other), expected[-1], atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    torch._dynamo.reset()
