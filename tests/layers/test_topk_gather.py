"""Fused top-K category gather and contrastive logits: the compiled op against the pure-PyTorch
references (which are themselves checked against a brute-force Python sort), float64
gradcheck, forced categories, determinism, bad inputs, CUDA mirrors and the no-host-sync
guarantee."""

import math
import warnings

import pytest
import torch

from cqdino import _ext
from cqdino.layers import (
    contrastive_logits,
    contrastive_logits_reference,
    topk_category_gather,
    topk_category_gather_reference,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

needs_ext = pytest.mark.skipif(not _ext.has_ext(), reason="cqdino._C is not built")


def _brute_force(scores, k, force=None):
    """Top-k ids of every row with Python's sort: (forced, score, -index), NaN lowest."""
    out = []
    for b, row in enumerate(scores.double().tolist()):

        def rank(i):
            s = row[i]
            s = -math.inf if math.isnan(s) else s
            forced = bool(force[b, i]) if force is not None else False
            return (not forced, math.isnan(row[i]), -s, i)

        chosen = sorted(range(len(row)), key=rank)[:k]
        out.append(sorted(chosen, key=lambda i: rank(i)[1:]))
    return torch.tensor(out, dtype=torch.long)


def _tied_scores(B, C, dtype=torch.float32, levels=7, device="cpu"):
    """Scores with many ties, a NaN, infinities and both zeros."""
    s = torch.randint(-levels, levels + 1, (B, C)).to(dtype) / 2
    s[:, 0] = -0.0
    s[0, 1 % C] = float("nan")
    s[-1, 2 % C] = float("inf")
    s[-1, 3 % C] = -float("inf")
    return s.to(device)


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("with_force", [False, True])
def test_reference_matches_brute_force(k, with_force, rng_seed):
    scores = _tied_scores(3, 40)
    force = torch.rand(3, 40) < 0.2 if with_force else None
    if with_force:
        force[1] = torch.rand(40) < 0.8  # more forced than k for small k
    emb = torch.randn(40, 4)
    idx, gathered = topk_category_gather_reference(scores, emb, k, force)
    assert torch.equal(idx, _brute_force(scores, k, force)), f"seed {rng_seed}"
    assert torch.equal(gathered, emb[idx])


def test_reference_hand_case():
    scores = torch.tensor([[0.5, float("nan"), 2.0, 0.5, -float("inf"), 2.0, -0.0, 0.0]])
    emb = torch.arange(8.0)[:, None]
    idx, _ = topk_category_gather_reference(scores, emb, 8)
    assert idx.tolist() == [[2, 5, 0, 3, 6, 7, 4, 1]]
    force = torch.zeros(1, 8, dtype=torch.bool)
    force[0, [1, 4, 7]] = True
    idx, _ = topk_category_gather_reference(scores, emb, 4, force)
    assert idx.tolist() == [[2, 7, 4, 1]]
    idx, _ = topk_category_gather_reference(scores, emb, 2, force)
    assert idx.tolist() == [[7, 4]]


# ---------------------------------------------------------------- op against the reference


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("C,k", [(1, 1), (37, 1), (37, 37), (300, 17), (1000, 300)])
def test_matches_reference(device, dtype, shared, C, k, rng_seed):
    B, D = 3, 5
    scores = _tied_scores(B, C, dtype, device=device)
    emb = torch.randn((C, D) if shared else (B, C, D), device=device)
    idx, gathered = topk_category_gather(scores, emb, k)
    ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k)
    assert idx.dtype == torch.long and idx.shape == (B, k)
    assert torch.equal(idx, ref_idx), f"seed {rng_seed}"
    assert torch.equal(gathered, ref_gathered)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_continuous_scores_and_dtypes(device, rng_seed):
    B, C, D, k = 4, 2000, 24, 100
    scores = torch.randn(B, C, device=device)
    for emb_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        emb = torch.randn(B, C, D, device=device).to(emb_dtype)
        idx, gathered = topk_category_gather(scores, emb, k)
        ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k)
        assert gathered.dtype == emb_dtype
        assert torch.equal(idx, ref_idx) and torch.equal(gathered, ref_gathered), f"seed {rng_seed}"
    # float64 scores that collapse to the same float32 value must still be ordered exactly
    s64 = torch.full((2, 50), 1.0, dtype=torch.float64, device=device)
    s64 += torch.arange(50, device=device, dtype=torch.float64) * 1e-12
    idx, _ = topk_category_gather(s64, torch.randn(50, 3, device=device), 10)
    assert idx[0].tolist() == list(range(49, 39, -1))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("odd_dim", [1, 3, 8, 13])
def test_strided_embeddings(device, odd_dim):
    B, C, k = 2, 64, 9
    scores = torch.randn(B, C, device=device)
    base = torch.randn(C, B, odd_dim + 2, device=device, dtype=torch.float16)
    emb = base.transpose(0, 1)[..., 1 : odd_dim + 1]  # [B, C, D], rows not contiguous
    idx, gathered = topk_category_gather(scores, emb, k)
    ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k)
    assert torch.equal(idx, ref_idx) and torch.equal(gathered, ref_gathered)
    shared = torch.randn(odd_dim, C, device=device).t()  # [C, D] with a column stride
    assert torch.equal(
        topk_category_gather(scores, shared, k)[1],
        topk_category_gather_reference(scores, shared, k)[1],
    )


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_large_c(device, rng_seed):
    B, C, D, k = 2, 200_000, 4, 2000
    scores = torch.randn(B, C, device=device)
    scores[1, ::3] = 0.25  # heavy ties across the threshold
    emb = torch.randn(C, D, device=device)
    idx, gathered = topk_category_gather(scores, emb, k)
    ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k)
    assert torch.equal(idx, ref_idx), f"seed {rng_seed}"
    assert torch.equal(gathered, ref_gathered)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 4, 12, 30])
def test_force(device, k, rng_seed):
    B, C, D = 4, 30, 3
    scores = _tied_scores(B, C, levels=3, device=device)
    force = torch.zeros(B, C, dtype=torch.bool, device=device)
    force[0, [3, 7, 29]] = True  # fewer than k (for k > 3)
    force[1] = torch.rand(C, device=device) < 0.6  # usually more than k
    force[2] = True  # everything forced
    emb = torch.randn(B, C, D, device=device)
    idx, gathered = topk_category_gather(scores, emb, k, force=force)
    assert torch.equal(idx.cpu(), _brute_force(scores.cpu(), k, force.cpu())), f"seed {rng_seed}"
    ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k, force)
    assert torch.equal(idx, ref_idx) and torch.equal(gathered, ref_gathered)
    n_forced = force.sum(1)
    picked_forced = force.gather(1, idx).sum(1)
    assert torch.equal(picked_forced, n_forced.clamp(max=k))


@needs_ext
def test_nan_handling():
    scores = torch.tensor([[1.0, float("nan"), -float("inf"), 0.0]])
    emb = torch.randn(4, 2)
    idx, _ = topk_category_gather(scores, emb, 4)
    assert idx.tolist() == [[0, 3, 2, 1]]
    with pytest.raises(ValueError, match="NaN"):
        topk_category_gather(scores, emb, 2, check_finite=True)
    with pytest.raises(ValueError, match="NaN"):
        topk_category_gather_reference(scores, emb, 2, check_finite=True)


# ---------------------------------------------------------------- gradients


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_force", [False, True])
def test_gradcheck_float64(device, shared, with_force, rng_seed):
    B, C, D, k = 3, 9, 4, 4
    scores = _tied_scores(B, C, levels=2, device=device).double()
    force = (torch.rand(B, C, device=device) < 0.3) if with_force else None
    emb = torch.randn((C, D) if shared else (B, C, D), dtype=torch.float64, device=device)
    emb.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e: topk_category_gather(scores, e, k, force=force)[1], (emb,)
    ), f"seed {rng_seed}"


@needs_ext
@pytest.mark.parametrize("shared", [False, True])
def test_gradgradcheck_float64(shared):
    B, C, D, k = 2, 7, 3, 3
    scores = torch.randn(B, C, dtype=torch.float64)
    emb = torch.randn((C, D) if shared else (B, C, D), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda e: topk_category_gather(scores, e, k)[1], (emb,))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_backward_matches_reference_and_is_deterministic(device, dtype, rng_seed):
    B, C, D, k = 16, 50, 32, 40  # images overlap heavily on the shared rows
    scores = torch.randn(B, C, device=device)
    emb = torch.randn(C, D, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, k, D, device=device, dtype=dtype)

    def grad_of(fn):
        (g,) = torch.autograd.grad(fn(scores, emb, k)[1], emb, grad_out)
        return g

    ours = grad_of(topk_category_gather)
    # reference accumulated in float64 (the op accumulates in float32 and rounds once)
    idx, _ = topk_category_gather_reference(scores, emb, k)
    ref = torch.zeros(C, D, dtype=torch.float64, device=device)
    ref.index_add_(0, idx.flatten(), grad_out.double().flatten(0, 1))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours.double(), ref, **tol, msg=f"seed {rng_seed}")
    for _ in range(3):
        assert torch.equal(grad_of(topk_category_gather), ours)


@needs_ext
def test_no_grad_to_scores_and_index_not_differentiable():
    scores = torch.randn(2, 10, requires_grad=True)
    emb = torch.randn(2, 10, 3, requires_grad=True)
    idx, gathered = topk_category_gather(scores, emb, 4)
    assert not idx.requires_grad and gathered.requires_grad
    gathered.sum().backward()
    assert scores.grad is None
    picked = torch.zeros(2, 10, dtype=torch.bool)
    picked.scatter_(1, idx, True)
    assert torch.equal(emb.grad, picked[..., None].expand(-1, -1, 3).float())


# opcheck's test_aot_dispatch_dynamic sums every output into one float and cannot handle the
# int64 index output, so it is left out.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@needs_ext
def test_opcheck():
    op = torch.ops.cqdino
    scores = torch.randn(2, 20)
    for emb in (torch.randn(2, 20, 6, requires_grad=True), torch.randn(20, 6, requires_grad=True)):
        torch.library.opcheck(
            op.topk_category_gather.default, (scores, emb, 5), test_utils=OPCHECK_UTILS
        )
        shared = emb.dim() == 2
        idx = topk_category_gather_reference(scores, emb, 5)[0]
        torch.library.opcheck(
            op.topk_category_gather_backward.default,
            (torch.randn(2, 5, 6), idx, 20, shared),
            test_utils=OPCHECK_UTILS,
        )
    force = torch.rand(2, 20) < 0.3
    torch.library.opcheck(
        op.topk_category_gather.default,
        (scores, torch.randn(20, 6), 5, force),
        test_utils=OPCHECK_UTILS,
    )


def test_fallback_warns_once_and_uses_reference(monkeypatch):
    scores, emb = _tied_scores(2, 30), torch.randn(30, 4)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_ext, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = topk_category_gather(scores, emb, 7)
        out2 = topk_category_gather(scores, emb, 7)
    assert sum("pure-PyTorch reference" in str(w.message) for w in caught) == 1
    ref = topk_category_gather_reference(scores, emb, 7)
    for out in (out1, out2):
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fn", [topk_category_gather, topk_category_gather_reference])
def test_bad_inputs(fn):
    s, e = torch.randn(2, 10), torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="k must be"):
        fn(s, e, 11)
    with pytest.raises(ValueError, match="k must be"):
        fn(s, e, 0)
    with pytest.raises(ValueError, match="k must be"):
        fn(s, e, True)
    with pytest.raises(ValueError, match="per-image embeddings"):
        fn(s, torch.randn(3, 10, 4), 2)
    with pytest.raises(ValueError, match="per-image embeddings"):
        fn(s, torch.randn(2, 9, 4), 2)
    with pytest.raises(ValueError, match="shared embeddings"):
        fn(s, torch.randn(9, 4), 2)
    with pytest.raises(ValueError, match="scores must be"):
        fn(torch.randn(10), e, 2)
    with pytest.raises(ValueError, match="scores must be"):
        fn(torch.ones(2, 10, dtype=torch.long), e, 2)
    with pytest.raises(ValueError, match="force must be"):
        fn(s, e, 2, force=torch.ones(2, 10))
    with pytest.raises(ValueError, match="force must be"):
        fn(s, e, 2, force=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="on meta"):
        fn(s, e.to("meta"), 2)


@needs_ext
def test_op_checks_inputs_itself():
    op = torch.ops.cqdino.topk_category_gather
    with pytest.raises(ValueError, match="k must be"):
        op(torch.randn(2, 10), torch.randn(10, 3), 11)
    with pytest.raises(ValueError, match="embeddings must be"):
        op(torch.randn(2, 10), torch.randn(2, 10, 3).long(), 2)
    with pytest.raises(ValueError, match="force must be"):
        op(torch.randn(2, 10), torch.randn(10, 3), 2, torch.ones(2, 10))


# ---------------------------------------------------------------- contrastive logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [None, 3])
def test_logits_match_reference(device, layers, rng_seed):
    B, Q, K, D = 2, 7, 5, 16
    qshape = (B, Q, D) if layers is None else (layers, B, Q, D)
    q = torch.randn(qshape, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(B, K, D, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.tensor(-4.595, dtype=torch.float64, device=device, requires_grad=True)
    ours = contrastive_logits(q, c, bias)
    ref = contrastive_logits_reference(q, c, bias)
    assert ours.shape == qshape[:-1] + (K,)
    torch.testing.assert_close(ours, ref, msg=f"seed {rng_seed}")
    # independent check of the formula on one entry
    n = (0,) if layers is not None else ()
    expect = (q[n + (1, 2)] @ c[1, 3]) / math.sqrt(D) + bias
    torch.testing.assert_close(ours[n + (1, 2, 3)].cpu(), expect.detach().cpu())
    g = torch.randn_like(ref)
    got = torch.autograd.grad(ours, (q, c, bias), g)
    want = torch.autograd.grad(ref, (q, c, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_gradcheck(device):
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    c = torch.randn(2, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(contrastive_logits, (q, c, bias))


def test_logits_bad_inputs():
    q, c, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.tensor(0.0)
    with pytest.raises(ValueError, match="queries"):
        contrastive_logits(torch.randn(3, 4), c, b)
    with pytest.raises(ValueError, match="do not match"):
        contrastive_logits(torch.randn(2, 3, 5), c, b)
    with pytest.raises(ValueError, match="do not match"):
        contrastive_logits(torch.randn(3, 3, 4), c, b)
    with pytest.raises(ValueError, match="bias"):
        contrastive_logits(q, c, torch.zeros(2))
    with pytest.raises(TypeError):  # no padding mask: every image has exactly K slots
        contrastive_logits(q, c, b, torch.ones(2, 5, dtype=torch.bool))


# ---------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
def test_cuda_no_host_sync(shared):
    B, C, D, k = 4, 13204, 256, 100
    scores = torch.randn(B, C, device="cuda")
    force = torch.rand(B, C, device="cuda") < 0.001
    emb = torch.randn((C, D) if shared else (B, C, D), device="cuda", requires_grad=True)
    q = torch.randn(7, B, 900, D, device="cuda", requires_grad=True)
    bias = torch.zeros((), device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, gathered = topk_category_gather(scores, emb, k, force=force)
        logits = contrastive_logits(q, gathered, bias)
        logits.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_idx, ref_gathered = topk_category_gather_reference(scores, emb, k, force)
    assert torch.equal(idx, ref_idx) and torch.equal(gathered, ref_gathered)


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    B, C, D, k = 3, 13204, 64, 1000
    scores = _tied_scores(B, C, dtype, levels=50)
    emb = torch.randn(C, D)
    cpu = topk_category_gather(scores, emb, k)
    gpu = topk_category_gather(scores.cuda(), emb.cuda(), k)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
