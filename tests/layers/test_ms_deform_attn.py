"""Multi-scale deformable attention: the compiled op against the grid_sample reference,
float64 gradcheck, the module, and bad inputs."""

import importlib
import warnings

import pytest
import torch

from cqdino import _ext
from cqdino.layers import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_reference

from .msda_utils import level_tables, random_problem

op = torch.ops.cqdino
msda_module = importlib.import_module("cqdino.layers.ms_deform_attn")

SHAPE_CASES = {
    "two_levels": [(6, 7), (3, 5)],
    "odd_sizes": [(5, 9), (3, 1), (1, 7)],
    "one_level": [(4, 4)],
    "five_levels": [(8, 6), (4, 3), (2, 2), (1, 1), (3, 5)],
}


def _grad(fn, inputs):
    out = fn(*inputs)
    g = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
@pytest.mark.parametrize("points", [1, 3])
def test_gradcheck_float64(case, points, rng_seed):
    value, shapes, starts, loc, attn = random_problem(
        SHAPE_CASES[case], batch=2, queries=3, heads=2, head_dim=3, points=points, spread=0.3
    )
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), inputs, atol=1e-6, rtol=1e-5
    ), f"seed {rng_seed}"


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_matches_reference_float32(case, rng_seed):
    value, shapes, starts, loc, attn = random_problem(
        SHAPE_CASES[case], batch=3, queries=17, heads=4, head_dim=8, points=4, dtype=torch.float32
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    ours = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
    ref = ms_deform_attn_reference(inputs[0], shapes, starts, inputs[1], inputs[2])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=f"seed {rng_seed}")
    g = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip(("value", "loc", "attn"), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"grad {name}, seed {rng_seed}")


def test_points_exactly_on_borders_and_far_outside():
    shapes = [(3, 4)]
    value, ss, starts, _, _ = random_problem(shapes, batch=1, queries=1, heads=1, head_dim=2)
    # corners, edges, and points that must read as zero
    pts = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.5, 0.0], [-0.5, 0.5], [1.7, 0.2], [0.125, 1 / 6]],
        dtype=torch.float64,
    )
    loc = pts.view(1, 1, 1, 1, -1, 2).repeat(1, 1, 1, 1, 1, 1)
    attn = torch.ones(1, 1, 1, 1, pts.shape[0], dtype=torch.float64)
    for p in range(pts.shape[0]):
        a = torch.zeros_like(attn)
        a[..., p] = 1
        torch.testing.assert_close(
            ms_deform_attn(value, ss, starts, loc, a),
            ms_deform_attn_reference(value, ss, starts, loc, a),
        )
    # (0.125, 1/6) on a 3x4 map is pixel (0, 0) exactly: the output is that pixel's value
    a = torch.zeros_like(attn)
    a[..., 5] = 1
    torch.testing.assert_close(ms_deform_attn(value, ss, starts, loc, a)[0, 0], value[0, 0, 0])
    # far outside: exactly zero output and zero gradients
    a = torch.zeros_like(attn)
    a[..., 4] = 1
    v, lo, at = (t.clone().requires_grad_() for t in (value, loc, a))
    out = ms_deform_attn(v, ss, starts, lo, at)
    assert out.abs().max() == 0
    gv, gl, ga = torch.autograd.grad(out.sum(), (v, lo, at))
    assert gv.abs().max() == 0 and gl[..., 4, :].abs().max() == 0 and ga[..., 4].abs().max() == 0


def test_noncontiguous_inputs_are_accepted(rng_seed):
    value, shapes, starts, loc, attn = random_problem([(5, 6), (2, 3)], dtype=torch.float32)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn[..., ::1].transpose(3, 4).contiguous().transpose(3, 4)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes, starts, loc_nc, attn_nc),
        ms_deform_attn_reference(value, shapes, starts, loc, attn),
        atol=1e-5,
        rtol=1e-5,
    )


def test_cpu_backward_is_deterministic(rng_seed):
    value, shapes, starts, loc, attn = random_problem(
        [(16, 16), (8, 8)], batch=2, queries=300, heads=4, head_dim=16, dtype=torch.float32
    )
    grads = []
    for _ in range(2):
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_opcheck():
    value, shapes, starts, loc, attn = random_problem([(4, 5), (2, 2)], dtype=torch.float32)
    torch.library.opcheck(
        op.ms_deform_attn_forward,
        (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_()),
    )
    grad = torch.randn(2, 5, 8)
    torch.library.opcheck(
        op.ms_deform_attn_backward,
        (grad, value.detach(), shapes, starts, loc.detach(), attn.detach(), False),
    )


@pytest.mark.parametrize(
    "forward, backward",
    [
        ("ms_deform_attn_forward", "ms_deform_attn_backward"),
        ("_ms_deform_attn_forward_naive", "_ms_deform_attn_backward_naive"),
    ],
)
def test_fake_tensor_shapes(forward, backward):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        value = torch.empty(2, 30, 8, 32)
        shapes = torch.tensor([[5, 6]])
        starts = torch.tensor([0])
        loc = torch.empty(2, 11, 8, 1, 4, 2)
        attn = torch.empty(2, 11, 8, 1, 4)
        out = getattr(op, forward)(value, shapes, starts, loc, attn)
        assert out.shape == (2, 11, 256)
        gv, gl, ga = getattr(op, backward)(out, value, shapes, starts, loc, attn)
        assert gv.shape == value.shape and gl.shape == loc.shape and ga.shape == attn.shape


def test_compile_matches_eager():
    value, shapes, starts, loc, attn = random_problem([(4, 5), (2, 2)], dtype=torch.float32)
    compiled = torch.compile(ms_deform_attn, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(value, shapes, starts, loc, attn), ms_deform_attn(value, shapes, starts, loc, attn)
    )


def test_64bit_index_selection_logic():
    # DINO encoder at B=2: 2 * 22223 * 8 * 32 = 11.4 M elements, 32-bit is enough
    assert not op._ms_deform_attn_needs_64bit_index(2, 22223, 8, 32, 22223, 4, 4)
    # value with exactly 2^31 elements needs 64-bit
    assert op._ms_deform_attn_needs_64bit_index(1, 2**27, 8, 2, 10, 1, 1)
    assert not op._ms_deform_attn_needs_64bit_index(1, 2**27 - 1, 8, 2, 10, 1, 1)
    # locations: B*Q*H*L*P*2 = 2 * 2^24 * 8 * 4 * 4 * 2 > 2^31
    assert op._ms_deform_attn_needs_64bit_index(2, 100, 8, 32, 2**24, 4, 4)


# --- bad inputs -----------------------------------------------------------------------------


def _good():
    return list(random_problem([(4, 5), (2, 2)], dtype=torch.float32))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.__setitem__(0, a[0].long()), ValueError, "value must be float"),
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"value must be \[B, S, H, Dh\]"),
        (lambda a: a.__setitem__(3, a[3][..., :1]), ValueError, "sampling_locations must be"),
        (lambda a: a.__setitem__(4, a[4][..., :1]), ValueError, "attention_weights must be"),
        (lambda a: a.__setitem__(3, a[3].double()), ValueError, "same dtype|value's dtype"),
        (lambda a: a.__setitem__(1, a[1].int()), ValueError, "must be int64"),
        (lambda a: a.__setitem__(1, torch.tensor([[4, 5], [2, 3]])), ValueError, "add up to 26"),
        (lambda a: a.__setitem__(2, torch.tensor([0, 21])), ValueError, r"level_start_index\[1\]"),
        (lambda a: a.__setitem__(1, torch.tensor([[4, 5], [0, 2]])), ValueError, "non-positive"),
        (lambda a: a.__setitem__(2, torch.tensor([0])), ValueError, "1 entries but"),
        (lambda a: a.__setitem__(0, a[0][:0]), ValueError, "empty batch|must be"),
        (
            lambda a: (a.__setitem__(3, a[3][:, :0]), a.__setitem__(4, a[4][:, :0])),
            ValueError,
            "no queries",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=match):
        ms_deform_attn(*args)


def test_empty_batch_error_message():
    value, shapes, starts, loc, attn = _good()
    with pytest.raises(ValueError, match="empty batch"):
        ms_deform_attn(value[:0], shapes, starts, loc[:0], attn[:0])


def test_fallback_warns_once_and_uses_reference(monkeypatch):
    value, shapes, starts, loc, attn = _good()
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_ext, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = msda_module.ms_deform_attn(value, shapes, starts, loc, attn)
        out2 = msda_module.ms_deform_attn(value, shapes, starts, loc, attn)
    assert sum("pure-PyTorch reference" in str(w.message) for w in caught) == 1
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)


# --- module ---------------------------------------------------------------------------------


def _module_inputs(B=2, Q=7, C=32, shapes=((8, 10), (4, 5), (2, 3)), box=False):
    ss, starts, S = level_tables(shapes)
    query = torch.randn(B, Q, C)
    value = torch.randn(B, S, C)
    ref = torch.rand(B, Q, len(shapes), 4 if box else 2)
    return query, value, ref, ss, starts


@pytest.mark.parametrize("box", [False, True])
def test_module_matches_manual_reference(box):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    nn_init = torch.nn.init
    nn_init.normal_(m.sampling_offsets.weight, std=0.5)
    nn_init.normal_(m.attention_weights.weight, std=0.5)
    query, value, ref, ss, starts = _module_inputs(box=box)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, -5:] = True
    out = m(
        query,
        value=value,
        reference_points=ref,
        spatial_shapes=ss,
        level_start_index=starts,
        key_padding_mask=mask,
    )
    # the same computation written out with the reference op
    B, Q, _ = query.shape
    v = m.value_proj(value).masked_fill(mask[..., None], 0).view(B, -1, 4, 8)
    off = m.sampling_offsets(query).view(B, Q, 4, 3, 2, 2)
    w = m.attention_weights(query).view(B, Q, 4, 6).softmax(-1).view(B, Q, 4, 3, 2)
    if box:
        loc = ref[:, :, None, :, None, :2] + off / 2 * ref[:, :, None, :, None, 2:] * 0.5
    else:
        loc = ref[:, :, None, :, None, :] + off / ss.flip(-1)[None, None, None, :, None, :]
    expected = query + m.output_proj(ms_deform_attn_reference(v, ss, starts, loc, w))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.value_proj.weight.grad.abs().sum() > 0
    assert m.sampling_offsets.weight.grad.abs().sum() > 0


def test_module_not_batch_first_and_errors():
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    query, value, ref, ss, starts = _module_inputs()
    out = m(query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts)
    m.batch_first = False
    out_t = m(
        query.transpose(0, 1),
        value=value.transpose(0, 1),
        reference_points=ref,
        spatial_shapes=ss,
        level_start_index=starts,
    )
    torch.testing.assert_close(out_t.transpose(0, 1), out)
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="reference_points"):
        m(query, value=value)


def test_module_locations_stay_fp32_under_autocast(monkeypatch):
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    query, value, ref, ss, starts = _module_inputs()
    seen = {}
    real = msda_module.ms_deform_attn

    def spy(v, s, st, loc, w, **kwargs):
        seen.update(value=v.dtype, loc=loc.dtype, w=w.dtype)
        return real(v, s, st, loc, w, **kwargs)

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(
            query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts
        )
    assert seen == dict(value=torch.bfloat16, loc=torch.float32, w=torch.float32)
    assert torch.isfinite(out.float()).all()


# --- CUDA mirrors ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_cuda_matches_reference(case, rng_seed):
    value, shapes, starts, loc, attn = random_problem(
        SHAPE_CASES[case],
        batch=2,
        queries=33,
        heads=4,
        head_dim=8,
        points=4,
        dtype=torch.float32,
        device="cuda",
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    ours = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
    ref = ms_deform_attn_reference(inputs[0], shapes, starts, inputs[1], inputs[2])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_gradcheck_float64():
    value, shapes, starts, loc, attn = random_problem(
        SHAPE_CASES["odd_sizes"], batch=2, queries=3, heads=2, head_dim=3, device="cuda"
    )
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a),
        inputs,
        atol=1e-6,
        rtol=1e-5,
        nondet_tol=1e-10,
    )


@pytest.mark.cuda
def test_cuda_tables_on_cpu_or_device_agree():
    value, shapes, starts, loc, attn = random_problem(
        [(6, 7), (3, 5)], dtype=torch.float32, device="cuda"
    )
    a = ms_deform_attn(value, shapes, starts, loc, attn)
    b = ms_deform_attn(value, shapes.cpu(), starts.cpu(), loc, attn)
    torch.testing.assert_close(a, b)


# --- non-finite sampling locations ----------------------------------------------------------

NONFINITE = [
    (0, 0, 0, 0, 0, float("nan")),  # (b, q, h, l, p, x): NaN x
    (0, 1, 1, 1, 1, None),  # NaN y (None: set y, not x)
    (1, 2, 0, 0, 1, float("inf")),
    (1, 3, 1, 1, 0, float("-inf")),
]


def _nonfinite_problem(dtype):
    value, shapes, starts, loc, attn = random_problem(
        [(5, 6), (3, 2)], queries=4, dtype=dtype, generator=torch.Generator().manual_seed(3)
    )
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    loc = loc.clone()
    for b, q, h, lvl, p, x in NONFINITE:
        if x is None:
            loc[b, q, h, lvl, p, 1] = float("nan")
        else:
            loc[b, q, h, lvl, p, 0] = x
        bad[b, q, h, lvl, p] = True
    return value, shapes, starts, loc, attn, bad


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_reference], ids=["op", "ref"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_locations_contribute_zero(fn, dtype):
    value, shapes, starts, loc, attn, bad = _nonfinite_problem(dtype)
    # Independent answer: the same problem with those points' weights zeroed and their
    # locations moved anywhere finite (here the map centre).
    loc_ok = torch.where(bad[..., None], torch.full_like(loc, 0.5), loc)
    attn_ok = attn.masked_fill(bad, 0.0)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    inputs_ok = [t.clone().requires_grad_() for t in (value, loc_ok, attn_ok)]
    out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
    want = ms_deform_attn_reference(inputs_ok[0], shapes, starts, inputs_ok[1], inputs_ok[2])
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, **tol)
    g = torch.randn_like(out)
    gv, gl, ga = torch.autograd.grad(out, inputs, g)
    wv, wl, wa = torch.autograd.grad(want, inputs_ok, g)
    assert all(bool(torch.isfinite(t).all()) for t in (out, gv, gl, ga))
    torch.testing.assert_close(gv, wv, **tol)
    torch.testing.assert_close(gl[~bad], wl[~bad], **tol)
    torch.testing.assert_close(ga[~bad], wa[~bad], **tol)
    assert gl[bad].abs().max() == 0 and ga[bad].abs().max() == 0  # as if off the map


def test_reference_is_zero_for_finite_locations_too_large_for_grid_sample():
    # 2 * 1e38 - 1 is finite in float32, but grid_sample's own arithmetic overflows on it
    value, shapes, starts, loc, attn = random_problem([(4, 3)], dtype=torch.float32)
    loc = loc.clone()
    loc[0, 0, 0, 0, 0, 0] = 1e38
    loc[0, 1, 0, 0, 0, 1] = -1e38
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        out = fn(value, shapes, starts, loc, attn)
        assert bool(torch.isfinite(out).all())
    attn_ok = attn.clone()
    attn_ok[0, 0, 0, 0, 0] = attn_ok[0, 1, 0, 0, 0] = 0
    want = ms_deform_attn_reference(value, shapes, starts, loc.clamp(-1, 2), attn_ok)
    torch.testing.assert_close(ms_deform_attn_reference(value, shapes, starts, loc, attn), want)


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_reference], ids=["op", "ref"])
def test_check_finite_raises_on_nonfinite_locations(fn):
    value, shapes, starts, loc, attn, _ = _nonfinite_problem(torch.float64)
    with pytest.raises(
        ValueError, match=r"4 non-finite values .*first at index \(0, 0, 0, 0, 0, 0\)"
    ):
        fn(value, shapes, starts, loc, attn, check_finite=True)
    good = random_problem([(5, 6), (3, 2)], queries=4)
    torch.testing.assert_close(fn(*good, check_finite=True), fn(*good))


def test_module_check_finite_and_diverged_offsets():
    torch.manual_seed(0)
    query, value, ref, ss, starts = _module_inputs()
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    healthy = m(
        query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts
    )
    with torch.no_grad():
        m.sampling_offsets.bias[5] = float("inf")
    # default: the op's off-map rule would hide it; the module makes every query's output NaN
    out = m(query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts)
    assert bool(out.isnan().all()) and bool(torch.isfinite(healthy).all())
    m.check_finite = True
    with pytest.raises(ValueError, match="sampling_locations hold 14 non-finite values"):
        m(query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts)
    # non-finite *reference points* (an all-padding level) keep the op's rule: finite output
    m.check_finite = False
    with torch.no_grad():
        m.sampling_offsets.bias[5] = 0.0
    ref = ref.clone()
    ref[0, 2, 1] = float("nan")
    out = m(query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=starts)
    assert bool(torch.isfinite(out).all())


@pytest.mark.cuda
def test_cuda_nonfinite_locations_match_reference_and_check():
    value, shapes, starts, loc, attn, bad = _nonfinite_problem(torch.float64)
    cpu = [t.clone().requires_grad_() for t in (value, loc, attn)]
    dev = [t.cuda().requires_grad_() for t in (value, loc, attn)]
    want = ms_deform_attn_reference(cpu[0], shapes, starts, cpu[1], cpu[2])
    out = ms_deform_attn(dev[0], shapes.cuda(), starts.cuda(), dev[1], dev[2])
    torch.testing.assert_close(out.cpu(), want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, dev, g.cuda()), torch.autograd.grad(want, cpu, g)):
        torch.testing.assert_close(a.cpu(), b)
    with pytest.raises(ValueError, match="4 non-finite values"):
        ms_deform_attn(*(t.cuda() for t in (value, shapes, starts, loc, attn)), check_finite=True)


@pytest.mark.skipif(not _ext.has_ext(), reason="the compiled op is what the formula counts")
def test_flop_counter_counts_the_op_and_the_module_by_hand():
    """torch's FlopCounterMode counts the compiled op as 10 * B*Q*H*L*P*Dh (4 bilinear corner
    multiply-adds and the attention weight's, per channel) and the module as that plus its four
    linear layers (2 * rows * in * out each); counts written out by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    from cqdino.layers import ms_deform_attn_flops

    levels = [(6, 7), (3, 5)]  # 42 + 15 = 57 keys
    value, shapes, starts, loc, attn = random_problem(
        levels, batch=2, queries=3, heads=2, head_dim=4, points=3, spread=0.3
    )
    with FlopCounterMode(display=False) as fc:
        ms_deform_attn(value, shapes, starts, loc, attn)
    assert fc.get_total_flops() == 10 * 2 * 3 * 2 * 2 * 3 * 4 == 2880
    assert ms_deform_attn_flops(value.shape, loc.shape) == 2880
    with pytest.raises(ValueError, match="do not match"):
        ms_deform_attn_flops((2, 57, 3, 4), loc.shape)

    m = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    query, keys = torch.rand(2, 5, 16), torch.rand(2, 57, 16)
    ref = torch.rand(2, 5, 2, 2)
    with FlopCounterMode(display=False) as fc:
        m(query, value=keys, reference_points=ref, spatial_shapes=shapes, level_start_index=starts)
    linear = 2 * 2 * 57 * 16 * 16  # value_proj over the keys
    linear += 2 * 2 * 5 * 16 * (2 * 2 * 3 * 2 + 2 * 2 * 3 + 16)  # offsets, weights, output
    assert fc.get_total_flops() == linear + 10 * 2 * 5 * 2 * 2 * 3 * 8
