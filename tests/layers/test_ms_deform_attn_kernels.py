"""Multi-scale deformable attention kernels: every dtype against a float64 reference, both CPU
vector paths, thread-count invariance, deterministic mode, and the CUDA mirrors (optimised vs
naive vs reference, deterministic repeatability, second GPU, fallbacks, benchmark smoke run)."""

import json
import os
import sys

import pytest
import torch

from cqdino.layers import ms_deform_attn, ms_deform_attn_reference

from .msda_utils import random_problem

op = torch.ops.cqdino
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# dtype -> bound on the norm-wise relative error against a float64 reference evaluated on the
# same (rounded) inputs: only accumulation and output rounding differ.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LEVELS = [(9, 11), (5, 6), (3, 3), (1, 2)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _problem(dtype, device="cpu", head_dim=32, queries=23, heads=3, points=3, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    half = dtype in (torch.float16, torch.bfloat16)
    return random_problem(
        LEVELS,
        batch=batch,
        queries=queries,
        heads=heads,
        head_dim=head_dim,
        points=points,
        dtype=dtype,
        loc_dtype=torch.float32 if half else dtype,
        device=device,
        spread=0.15,
        generator=gen,
    )


def _check_against_fp64(dtype, device, head_dim, fn=ms_deform_attn):
    value, shapes, starts, loc, attn = _problem(dtype, device, head_dim)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_inputs = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(ref_inputs[0], shapes, starts, ref_inputs[1], ref_inputs[2])
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    tol = REL_TOL[dtype]
    assert _rel_err(out, ref) < tol, f"output {dtype} Dh={head_dim}: {_rel_err(out, ref)}"
    for name, a, b, t in zip(("value", "loc", "attn"), grads, ref_grads, (value, loc, attn)):
        assert a.dtype == t.dtype, name
        err = _rel_err(a, b)
        # grad_loc sums terms of both signs (its norm is small next to them): looser bound.
        bound = tol * (10 if name == "loc" and dtype in (torch.float16, torch.bfloat16) else 1)
        assert err < bound, f"grad {name} {dtype} Dh={head_dim}: rel err {err}"


@pytest.fixture(params=["auto", "default"])
def cpu_isa(request):
    """Runs a test with the run-time chosen vector path and with the portable one."""
    chosen = op._ms_deform_attn_cpu_isa(request.param)
    yield chosen
    op._ms_deform_attn_cpu_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 5])
def test_cpu_dtypes_against_float64(dtype, head_dim, cpu_isa):
    _check_against_fp64(dtype, "cpu", head_dim)


def _overflow_case(device):
    # Three samples of the same pixel, weights 1, 1, -1, value 60000: the exact output 60000 is
    # representable in fp16, but a partial sum (120000) is not.
    shapes = torch.tensor([[1, 1]], device=device)
    starts = torch.tensor([0], device=device)
    value = torch.full((1, 1, 1, 8), 60000.0, device=device, dtype=torch.float16)
    loc = torch.full((1, 1, 1, 1, 3, 2), 0.5, device=device)
    attn = torch.tensor([1.0, 1.0, -1.0], device=device).view(1, 1, 1, 1, 3)
    return value, shapes, starts, loc, attn


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fp16_accumulates_in_fp32(device):
    out = ms_deform_attn(*_overflow_case(device))
    assert out.dtype == torch.float16
    assert torch.equal(out.float().cpu(), torch.full((1, 1, 8), 60000.0))


def test_cpu_isa_hook():
    assert op._ms_deform_attn_cpu_isa("default") == "default"
    assert op._ms_deform_attn_cpu_isa("") == "default"
    assert op._ms_deform_attn_cpu_isa("auto") in ("avx2", "default")
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        op._ms_deform_attn_cpu_isa("sse9")


def test_cpu_vector_paths_agree(cpu_isa):
    # Dh = 32 takes the fixed-width path; its result must match the generic-width reference.
    value, shapes, starts, loc, attn = _problem(torch.float32, head_dim=32, queries=40)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    torch.testing.assert_close(
        out, ms_deform_attn_reference(value, shapes, starts, loc, attn), atol=2e-6, rtol=1e-5
    )


def test_cpu_results_do_not_depend_on_thread_count():
    value, shapes, starts, loc, attn = _problem(torch.float32, queries=64, heads=4)
    grad = torch.randn(2, 64, 4 * 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = op.ms_deform_attn_forward(value, shapes, starts, loc, attn)
            results.append(
                (out,) + op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn)
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_deterministic_flag_reaches_the_backward(monkeypatch):
    value, shapes, starts, loc, attn = _problem(torch.float32, queries=8)
    seen = []
    real = op.ms_deform_attn_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(op, "ms_deform_attn_backward", spy)
    grads = []
    for kwargs, global_flag in (({"deterministic": True}, False), ({}, False), ({}, True)):
        torch.use_deterministic_algorithms(global_flag)
        try:
            inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
            out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], **kwargs)
            grads.append(torch.autograd.grad(out.sum(), inputs))
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [True, False, True]
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)  # the CPU backward is deterministic either way


# --- CUDA -----------------------------------------------------------------------------------


class _Naive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn):
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return op._ms_deform_attn_forward_naive(value, shapes, starts, loc, attn)

    @staticmethod
    def backward(ctx, grad):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = op._ms_deform_attn_backward_naive(
            grad.contiguous(), value, shapes, starts, loc, attn
        )
        return gv, None, None, gl, ga


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 8, 1, 24])
def test_cuda_dtypes_against_float64(dtype, head_dim):
    # 32/8: vector path; 1: scalar path; 24: not a power-of-two group, naive fallback.
    _check_against_fp64(dtype, "cuda", head_dim)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_naive_baseline_against_float64(dtype):
    _check_against_fp64(dtype, "cuda", 32, fn=_Naive.apply)


@pytest.mark.cuda
def test_cuda_misaligned_value_uses_scalar_path():
    value, shapes, starts, loc, attn = _problem(torch.float32, "cuda", 32)
    flat = torch.cat([value.new_zeros(1), value.flatten()])
    shifted = flat[1:].view(value.shape)  # data pointer 4 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16 != 0
    torch.testing.assert_close(
        ms_deform_attn(shifted, shapes, starts, loc, attn),
        ms_deform_attn_reference(value, shapes, starts, loc, attn),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_deterministic_backward_is_bitwise_repeatable(dtype):
    # many queries per value pixel, so that atomics collide
    value, shapes, starts, loc, attn = _problem(dtype, "cuda", 32, queries=3000, heads=4)
    grad = torch.randn(2, 3000, 4 * 32, device="cuda").to(dtype)
    runs = [
        op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn, True) for _ in range(3)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    fast = op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn, False)
    for a, b in zip(runs[0], fast):
        assert _rel_err(a, b) < REL_TOL[dtype] * 10
    # honoured through autograd from the global switch
    torch.use_deterministic_algorithms(True)
    try:
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
        g = torch.autograd.grad(out, inputs, grad)
        for a, b in zip(g, runs[0]):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_cuda_deterministic_unsupported_head_dim_raises():
    value, shapes, starts, loc, attn = _problem(torch.float32, "cuda", 24)
    grad = torch.randn(2, loc.shape[1], 3 * 24, device="cuda")
    with pytest.raises(RuntimeError, match="deterministic CUDA backward"):
        op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn, True)


@pytest.mark.cuda
def test_cuda_coarse_level_staging_matches_global_atomics(monkeypatch):
    value, shapes, starts, loc, attn = _problem(torch.float32, "cuda", 32, queries=500)
    grad = torch.randn(2, 500, 3 * 32, device="cuda")
    monkeypatch.setenv("CQDINO_MSDA_STAGE_KB", "0")
    plain = op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn, False)
    monkeypatch.setenv("CQDINO_MSDA_STAGE_KB", "200")
    staged = op.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn, False)
    for a, b in zip(plain, staged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device():
    value, shapes, starts, loc, attn = _problem(torch.float32, "cuda:1", 32)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2])
    assert out.device == torch.device("cuda:1")
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(g.device == torch.device("cuda:1") and g.abs().sum() > 0 for g in grads)


@pytest.mark.cuda
def test_cuda_benchmark_quick_pass(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import ms_deform_attn as bench
    finally:
        sys.path.pop(0)
    path = tmp_path / "msda.json"
    bench.main(
        [
            "--device",
            "cuda",
            "--quick",
            "--repeats",
            "2",
            "--shapes",
            "decoder",
            "--json",
            str(path),
        ]
    )
    rows = json.loads(path.read_text())["results"]
    impls = {r["impl"] for r in rows}
    assert {"reference", "naive", "ours"} <= impls
    assert all(r["ms"] > 0 for r in rows)
