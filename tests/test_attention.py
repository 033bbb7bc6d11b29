import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from reference_impl import ReferenceMSProcessor

from msdiffusion.attention import MSAttentionState, MSAttnProcessor, TextOnlyAttnProcessor
from msdiffusion.layout import SubjectLayout

TEXT, DIM, CROSS = 7, 64, 32


def make_attention(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=DIM, cross_attention_dim=CROSS, heads=4, dim_head=16).eval()
    state = MSAttentionState()
    fast = MSAttnProcessor(DIM, CROSS, state)
    torch.nn.init.normal_(fast.to_k_ip.weight, std=0.3)
    torch.nn.init.normal_(fast.to_v_ip.weight, std=0.3)
    return attn, state, fast, ReferenceMSProcessor(fast)


def make_layout(**overrides):
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.6, 1.0], [0.4, 0.2, 1.0, 0.8], [0.1, 0.1, 0.3, 0.3]],
            [[0.2, 0.0, 0.9, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # one subject + padding
        ],
        dtype=torch.float64,
    )
    fields = dict(boxes=boxes, latent_size=(6, 10), scale=0.6, tokens_per_subject=4, num_dummy_tokens=2)
    fields.update(overrides)
    return SubjectLayout(**fields)


def inputs(layout, cfg=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = layout.batch_size
    hidden = torch.randn(rows * (2 if cfg else 1), 15, DIM, generator=g)  # 3x5 grid
    text = torch.randn(hidden.shape[0], TEXT, CROSS, generator=g)
    image = torch.randn(rows, layout.num_image_tokens, CROSS, generator=g)
    if cfg:
        image = torch.cat([torch.zeros_like(image), image])
    return hidden, torch.cat([text, image], dim=1)


def run(processor, attn, state, layout, hidden, context, static=False):
    with state.activate(layout, static_image_tokens=static):
        return processor(attn, hidden, context)


@pytest.mark.parametrize("cfg", [True, False])
def test_fast_matches_reference_with_boxes(cfg):
    attn, state, fast, ref = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout, cfg)
    torch.testing.assert_close(
        run(fast, attn, state, layout, hidden, context),
        run(ref, attn, state, layout, hidden, context),
        atol=1e-5,
        rtol=1e-5,
    )


def test_fast_matches_reference_with_subject_scales():
    attn, state, fast, ref = make_attention()
    layout = make_layout(subject_scales=torch.tensor([[0.3, 1.2, 0.0], [0.8, 0.0, 0.0]]))
    hidden, context = inputs(layout)
    out = run(fast, attn, state, layout, hidden, context)
    torch.testing.assert_close(out, run(ref, attn, state, layout, hidden, context), atol=1e-5, rtol=1e-5)
    plain = run(fast, attn, state, make_layout(), hidden, context)
    assert not torch.allclose(out, plain)


def test_subject_scales_equal_to_global_scale_give_global_result():
    attn, state, fast, _ = make_attention()
    hidden, context = inputs(make_layout())
    scaled = run(fast, attn, state, make_layout(subject_scales=torch.full((2, 3), 0.6)), hidden, context)
    torch.testing.assert_close(scaled, run(fast, attn, state, make_layout(), hidden, context), atol=1e-6, rtol=1e-5)


def test_auto_layout_matches_reference_over_steps():
    attn, state, fast, ref = make_attention()
    layout = make_layout(mask_threshold=0.4, start_step=3, phrase_positions=[[[1], [2, 3], []], [[5], [], []]])
    context = inputs(layout)[1]  # fixed during a generation, as the static cache assumes
    steps = [(inputs(layout, seed=s)[0], context) for s in range(5)]
    with state.activate(layout, static_image_tokens=True):
        fast_out = [fast(attn, h, c) for h, c in steps]
    with state.activate(layout):
        ref_out = [ref(attn, h, c) for h, c in steps]
    for a, b in zip(fast_out, ref_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the auto masks took over from step 3: results differ from box-only masks there
    with state.activate(make_layout(), static_image_tokens=True):
        boxes_only = [fast(attn, h, c) for h, c in steps]
    torch.testing.assert_close(fast_out[0], boxes_only[0])
    assert not torch.allclose(fast_out[4], boxes_only[4])
    # a new generation starts a new running mean
    with state.activate(layout):
        torch.testing.assert_close(fast(attn, *steps[0]), fast_out[0])


def test_negative_half_is_plain_text_attention():
    attn, state, fast, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    out = run(fast, attn, state, layout, hidden, context)
    plain = AttnProcessor2_0()(attn, hidden[:2], context[:2, :TEXT])
    torch.testing.assert_close(out[:2], plain)


def test_static_cache_matches_and_is_dropped_between_generations():
    attn, state, fast, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    first = run(fast, attn, state, layout, hidden, context, static=True)
    torch.testing.assert_close(first, run(fast, attn, state, layout, hidden, context))
    hidden2, context2 = inputs(layout, seed=7)  # new tokens in a new generation must be used
    torch.testing.assert_close(
        run(fast, attn, state, layout, hidden2, context2, static=True),
        run(fast, attn, state, layout, hidden2, context2),
    )


def test_no_layout_is_plain_attention_and_gradients_flow_in_training():
    attn, state, fast, _ = make_attention()
    hidden, context = inputs(make_layout())
    torch.testing.assert_close(
        fast(attn, hidden, context[:, :TEXT]), AttnProcessor2_0()(attn, hidden, context[:, :TEXT])
    )
    layout = make_layout()
    with state.activate(layout):
        fast(attn, hidden[2:], context[2:]).square().mean().backward()
    assert fast.to_k_ip.weight.grad.abs().sum() > 0 and fast.to_v_ip.weight.grad.abs().sum() > 0


def test_batch_size_mismatch_is_explained():
    attn, state, fast, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    with pytest.raises(ValueError, match="does not match a layout"):
        run(fast, attn, state, layout, hidden[:3], context[:3])


def test_text_only_processor_ignores_image_tokens():
    attn, state, _, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    with state.activate(layout):
        out = TextOnlyAttnProcessor(state)(attn, hidden, context)
    torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden, context[:, :TEXT]))


def test_activation_blocks_nest_and_restore_the_outer_layout():
    attn, state, fast, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    with state.activate(layout, static_image_tokens=True):
        before = fast(attn, hidden, context)
        with state.activate(None):
            assert state.layout is None
            fast(attn, hidden, context[:, :TEXT])
        assert state.layout is layout
        torch.testing.assert_close(fast(attn, hidden, context), before)
    assert state.layout is None


def cuda_fused_kernel_problems(query, key, value, mask) -> list[str]:
    """Why CUDA's fused SDPA kernels (memory-efficient / cuDNN; flash takes no mask) would refuse
    this call, by the checks of torch's `sdp_utils` that do not depend on the GPU; [] if none."""
    problems = []
    if mask is not None and mask.dtype not in (torch.bool, query.dtype):
        problems.append(f"mask dtype {mask.dtype} != query dtype {query.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value), ("mask", mask)):
        if t is not None and t.stride(-1) != 1:
            problems.append(f"{name}.stride(-1) = {t.stride(-1)}: fused kernels need 1")
    if query.shape[-1] % 8 or value.shape[-1] % 8:
        problems.append("head_dim not a multiple of 8")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.storage_offset() * t.element_size() % 16:
            problems.append(f"{name} storage offset not 16-byte aligned")
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-2:] != (query.shape[-2], key.shape[-2]):
            problems.append(f"mask shape {tuple(mask.shape)}")
        elif mask.shape[0] not in (1, query.shape[0]) or mask.shape[1] not in (1, query.shape[1]):
            problems.append(f"mask shape {tuple(mask.shape)} does not broadcast over batch/heads")
        # not a refusal, but the memory-efficient kernel then pads a copy of the mask at every call
        if any(s % 8 for s in mask.stride()[:-1]):
            problems.append(f"mask strides {mask.stride()} not multiples of 8 (copied at every call)")
    return problems


def test_fused_kernel_check_flags_the_old_transposed_mask():
    q = torch.randn(1, 4, 15, 16, dtype=torch.float16)
    k = v = torch.randn(1, 4, 36, 16, dtype=torch.float16)
    transposed = torch.zeros(1, 36, 15, dtype=torch.float16).transpose(1, 2)[:, None]
    assert any("mask.stride(-1)" in p for p in cuda_fused_kernel_problems(q, k, v, transposed))
    assert any("dtype" in p for p in cuda_fused_kernel_problems(q, k, v, torch.zeros(1, 1, 15, 36)))
    assert cuda_fused_kernel_problems(q, k, v, None) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("auto_layout", [False, True])
def test_image_branch_call_is_eligible_for_fused_kernels(monkeypatch, dtype, auto_layout):
    attn, state, fast, _ = make_attention()
    attn.to(dtype), fast.to(dtype)
    extra = (
        dict(mask_threshold=0.4, start_step=1, phrase_positions=[[[1], [2], []], [[5], [], []]]) if auto_layout else {}
    )
    layout = make_layout(**extra)
    hidden, context = (x.to(dtype) for x in inputs(layout))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q, k, v, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad(), state.activate(layout, image_tokens=context[2:, TEXT:]):
        # The CPU's fused kernel must take the call too (no fallback to the math path).
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            fast(attn, hidden, context)
    # auto layout adds one call between them: its phrase maps, the phrase weights as values
    text_call, *maps_call, image_call = calls
    assert len(maps_call) == int(auto_layout)
    for call in calls:
        assert cuda_fused_kernel_problems(*call) == []
    assert image_call[3].dtype == dtype


def test_processor_call_runs_no_math_attention_on_cpu():
    attn, state, fast, _ = make_attention()
    layout = make_layout()
    hidden, context = inputs(layout)
    with torch.no_grad(), state.activate(layout, image_tokens=context[2:, TEXT:]):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast(attn, hidden, context)
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "attention_math" in n]
    assert sum("scaled_dot_product_flash_attention" in n for n in names) == 2
    # masks and the subject keys/values were made on activation: no projection of the image tokens here
    assert sum(n == "aten::linear" for n in names) == 4  # to_q, to_k, to_v, to_out: as many as plain attention


def test_activation_with_image_tokens_matches_per_call_projection():
    attn, state, fast, _ = make_attention()
    layout = make_layout(subject_scales=torch.tensor([[0.3, 1.2, 0.0], [0.8, 0.0, 0.0]]))
    hidden, context = inputs(layout)
    with state.activate(layout, image_tokens=context[2:, TEXT:]):
        prepared = fast(attn, hidden, context)
    torch.testing.assert_close(prepared, run(fast, attn, state, layout, hidden, context))
    with pytest.raises(ValueError, match="conditional rows"):
        with state.activate(layout, image_tokens=context[:, TEXT:]):
            pass
