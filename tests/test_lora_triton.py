"""Fused Triton LoRA (``backend="triton"``) against the float64 reference, under the interpreter on CPU.

Every buffer a kernel writes is handed out NaN-filled, so an element a kernel forgets is a NaN in
the comparison. Dropout runs with a fixed seed; the reference gets exactly the kernels' masks
(``dropout_mask``), so forward and gradients agree only if backward uses the forward's masks.
"""
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fastfair.int8 import Int8Weight
from fastfair.kernels import _utils
from fastfair.kernels.lora import dropout_mask
from fastfair.ops import lora_design as ld
from fastfair.ops import lora_triton as lt
from fastfair.ops.lora import force_design, lora_linear, lora_linear_reference

SEED = 20261125
DRAW_SEED = lt._draw_seed  # the real one, before the fixture pins it
TOL = {torch.float32: 2e-4, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "alloc", nan_alloc)
    monkeypatch.setattr(lt, "_draw_seed", lambda device: SEED)


def force(monkeypatch, design=None, int8=None):
    """Force through the environment (the public switch), restored after the test."""
    for env, value in ((ld.ENV_DESIGN, design), (ld.ENV_INT8, int8)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)


def make_x(layout, M, K, dtype):
    if layout == "2d":
        return torch.randn(M, K, dtype=dtype)
    if layout == "3d":
        return torch.randn(2, M, K, dtype=dtype)
    if layout == "3d_permuted":  # reshape(-1, K) must copy
        return torch.randn(M, 2, K, dtype=dtype).transpose(0, 1)
    return torch.randn(M, 2 * K, dtype=dtype)[:, ::2]  # strided last dim: a view with stride 2


def run_case(M, K, N, dtype, ranks, scales, ps, trainable, layout="2d", bias="trainable",
             int8=False, training=True, x_grad=True):
    """Run the Triton op and the float64 reference; compare outputs and every gradient."""
    torch.manual_seed(M * 1000 + K * 10 + N)
    x = make_x(layout, M, K, dtype).requires_grad_(x_grad)
    if int8:
        CB = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        SCB = torch.rand(N) / math.sqrt(K) + 0.05
        weight, weight64 = Int8Weight(CB, SCB), Int8Weight(CB, SCB.double())
    else:
        weight = torch.randn(N, K, dtype=dtype) / math.sqrt(K)
        weight64 = weight.double()
    b = None if bias is None else torch.randn(N, dtype=dtype).requires_grad_(bias == "trainable")
    As = [(torch.randn(r, K) / math.sqrt(K)).requires_grad_(t) for r, t in zip(ranks, trainable)]
    Bs = [torch.randn(N, r).requires_grad_(t) for r, t in zip(ranks, trainable)]

    backend = "torch" if ld.forced()[0] in ld.TORCH_DESIGNS else "triton"
    y = lora_linear(x, weight, b, As, Bs, scales, ps, training, backend=backend)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    dy = torch.randn_like(y)
    if y.requires_grad:
        y.backward(dy)

    masks = [dropout_mask(SEED, x[..., 0].numel(), K, p, a, "cpu").reshape(x.shape)
             if training and p > 0 else None for a, p in enumerate(ps)]
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    x64, b64, A64, B64 = d(x), d(b), [d(A) for A in As], [d(B) for B in Bs]
    y64 = lora_linear_reference(x64, weight64, b64, A64, B64, scales, ps, training, masks=masks)
    tol = TOL[dtype]

    def close(got, want, what):
        assert got is not None, f"{what}: no gradient"
        err = (got.double() - want).abs().max().item()
        assert err <= tol * (1 + want.abs().max().item()), f"{what}: max error {err}"

    close(y, y64, "y")
    if y64.requires_grad:
        y64.backward(dy.double())
    if x_grad:
        close(x.grad, x64.grad, "dx")
    if b is not None:
        if bias == "trainable":
            close(b.grad, b64.grad, "dbias")
        else:
            assert b.grad is None
    for a, t in enumerate(trainable):
        if t:
            close(As[a].grad, A64[a].grad, f"dA[{a}]")
            close(Bs[a].grad, B64[a].grad, f"dB[{a}]")
        else:
            assert As[a].grad is None and Bs[a].grad is None


@st.composite
def cases(draw):
    n = draw(st.integers(0, 3))
    return dict(
        M=draw(st.integers(1, 48)), K=draw(st.integers(1, 64)), N=draw(st.integers(1, 64)),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        ranks=[draw(st.integers(1, 20)) for _ in range(n)],
        scales=[draw(st.sampled_from([2.0, 0.5, -1.0, 1 / 3])) for _ in range(n)],
        ps=[draw(st.sampled_from([0.0, 0.25, 0.5])) for _ in range(n)],
        trainable=[draw(st.booleans()) for _ in range(n)],
        layout=draw(st.sampled_from(["2d", "3d", "3d_permuted", "strided"])),
        bias=draw(st.sampled_from([None, "frozen", "trainable"])),
        int8=draw(st.booleans()),
        training=draw(st.sampled_from([True, True, False])),
        x_grad=draw(st.sampled_from([True, True, False])),
    ), draw(st.sampled_from([None, *ld.DESIGNS])), draw(st.sampled_from([None, *ld.INT8_MODES]))


@given(cases())
def test_matches_float64_reference(case):
    kw, design, int8_mode = case
    p = ld.Problem(kw["M"], kw["K"], kw["N"], sum(kw["ranks"]), kw["dtype"],
                   kw["training"] and any(q > 0 for q in kw["ps"]), kw["int8"], "cpu", len(kw["ranks"]), True)
    assume(design is None or ld.applicable(design, p, int8_mode))
    assume(not (design == "reference" and p.dropout))  # torch's RNG: masks the test cannot know
    with force_design(design, int8_mode):
        run_case(**kw)


@pytest.mark.parametrize("design", ld.TRITON_DESIGNS)
def test_large_rank_several_adapters_with_dropout(monkeypatch, design):
    force(monkeypatch, design)
    run_case(M=40, K=50, N=36, dtype=torch.float32, ranks=[64, 3, 17], scales=[0.25, 2.0, -1.0],
             ps=[0.5, 0.1, 0.0], trainable=[True, False, True], layout="3d")


@pytest.mark.parametrize("design, int8_design", [
    ("cublas", "dequant"), ("fused", "dequant"), ("fused", "inloop"), ("fused_inloop", "inloop")])
def test_int8_base(monkeypatch, design, int8_design):
    force(monkeypatch, design, int8_design)
    run_case(M=33, K=47, N=40, dtype=torch.float16, ranks=[8, 5], scales=[2.0, 0.5], ps=[0.25, 0.0],
             trainable=[True, True], int8=True, bias="trainable")


@pytest.mark.parametrize("design, launches", [("fused", 2), ("cublas", 0)])
def test_design_switch_picks_the_path(monkeypatch, design, launches):
    calls = []
    real = lt.kl.lora_gemm
    monkeypatch.setattr(lt.kl, "lora_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    force(monkeypatch, design)
    run_case(M=20, K=24, N=18, dtype=torch.float32, ranks=[4], scales=[1.0], ps=[0.0], trainable=[True])
    assert len(calls) == launches


def _spy(monkeypatch):
    """Record the down-projection launches and each lora_gemm call's in-loop operands."""
    calls = {"down": 0, "gemm": []}
    real_down, real_gemm = lt.kl.lora_down, lt.kl.lora_gemm

    def down(*a, **k):
        calls["down"] += 1
        return real_down(*a, **k)

    def gemm(*a, **k):
        calls["gemm"].append({key: k.get(key) is not None for key in ("V", "dB", "L")})
        return real_gemm(*a, **k)

    monkeypatch.setattr(lt.kl, "lora_down", down)
    monkeypatch.setattr(lt.kl, "lora_gemm", gemm)
    return calls


@pytest.mark.parametrize("ps, ranks, down_fwd, in_loop", [
    ([0.0, 0.0], [40, 24], 0, True),  # R = 64: everything in the GEMMs' loops
    ([0.25, 0.0], [9, 7], 2, True),  # dropout: the forward down-projection is a pass per adapter
    ([0.0, 0.0], [40, 25], 2, False),  # R = 65 > DOWN_MAX_RANK: the split form
])
def test_fused_design_takes_the_down_projection_into_the_loop(monkeypatch, ps, ranks, down_fwd, in_loop):
    force(monkeypatch, "fused_inloop")
    calls = _spy(monkeypatch)
    # M spans 4 row blocks and K 3 column blocks of the interpreter's 32×32 tiles, so the atomic
    # dB sums over row blocks and only column block 0 may add.
    run_case(M=100, K=70, N=45, dtype=torch.float32, ranks=ranks, scales=[0.5, -2.0], ps=ps,
             trainable=[True, True], bias="trainable")
    assert calls["down"] == down_fwd
    fwd, dx = calls["gemm"]
    assert fwd["V"] == (in_loop and down_fwd == 0) and dx["V"] == in_loop and dx["dB"] == in_loop


@pytest.mark.parametrize("x_grad", [True, False])
def test_in_loop_dropout_masks_per_adapter(monkeypatch, x_grad):
    # Two dropped adapters and a frozen one between them inside one in-loop dX launch: each
    # adapter's columns of g must meet its own mask (a mask drawn for the wrong adapter passes
    # any test with a single dropped adapter).
    force(monkeypatch, "fused_inloop")
    calls = _spy(monkeypatch)
    run_case(M=70, K=100, N=45, dtype=torch.float32, ranks=[5, 9, 3], scales=[0.5, -2.0, 1 / 3],
             ps=[0.5, 0.0, 0.25], trainable=[True, False, True], x_grad=x_grad, layout="3d_permuted")
    if x_grad:
        assert calls["gemm"][1]["V"] and calls["gemm"][1]["dB"]


def test_deterministic_mode_keeps_dB_off_atomics(monkeypatch):
    force(monkeypatch, "fused_inloop")
    calls = _spy(monkeypatch)
    torch.use_deterministic_algorithms(True)
    try:
        run_case(M=70, K=40, N=36, dtype=torch.float32, ranks=[8], scales=[2.0], ps=[0.0],
                 trainable=[True])
    finally:
        torch.use_deterministic_algorithms(False)
    assert [c["V"] for c in calls["gemm"]] == [True, True] and not calls["gemm"][1]["dB"]


def test_unknown_design_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="'fast'"):
        with force_design("fast"):
            pass
    force(monkeypatch, "fast")
    with pytest.raises(ValueError, match=f"{ld.ENV_DESIGN}.*'fast'"):
        lora_linear(**_args(), training=True, backend="triton")


def test_dropout_mask_is_a_function_of_seed_position_and_adapter():
    m0 = dropout_mask(SEED, 64, 64, 0.3, 0, "cpu")
    assert m0.dtype == torch.bool and m0.shape == (64, 64)
    assert abs(m0.float().mean().item() - 0.7) < 0.04
    assert torch.equal(m0, dropout_mask(SEED, 64, 64, 0.3, 0, "cpu"))
    assert not torch.equal(m0, dropout_mask(SEED, 64, 64, 0.3, 1, "cpu"))
    assert not torch.equal(m0, dropout_mask(SEED + 1, 64, 64, 0.3, 0, "cpu"))
    assert dropout_mask(SEED, 64, 64, 0.0, 0, "cpu").all()
    # Position, not tiling: the top-left block of a bigger mask is the mask of the smaller shape
    # only where offsets m·K + k coincide, i.e. with the same row length K.
    assert torch.equal(m0[:17], dropout_mask(SEED, 17, 64, 0.3, 0, "cpu"))


def test_fresh_seed_per_call_in_training_only(monkeypatch):
    monkeypatch.setattr(lt, "_draw_seed", DRAW_SEED)
    x = torch.randn(16, 20)
    W = torch.randn(12, 20)
    A, B = torch.randn(4, 20), torch.randn(12, 4)
    y1 = lt.lora_linear_triton(x, W, None, [A], [B], [1.0], [0.5], True)
    y2 = lt.lora_linear_triton(x, W, None, [A], [B], [1.0], [0.5], True)
    assert not torch.allclose(y1, y2)
    e1 = lt.lora_linear_triton(x, W, None, [A], [B], [1.0], [0.5], False)
    e2 = lt.lora_linear_triton(x, W, None, [A], [B], [1.0], [0.5], False)
    assert torch.equal(e1, e2)


def test_dequant_buffer_follows_in_place_updates():
    torch.manual_seed(0)
    x = torch.randn(10, 24)
    CB = torch.randint(-127, 128, (16, 24), dtype=torch.int8)
    SCB = torch.rand(16) + 0.5
    A, B = torch.randn(2, 24), torch.randn(16, 2)
    for step in range(3):
        if step == 1:
            CB.neg_()  # same tensor, new version: the cached dequantization is stale
        if step == 2:
            CB = CB.clone()[:, torch.randperm(24)]  # another tensor, maybe at a reused address
        w = Int8Weight(CB, SCB)
        y = lt.lora_linear_triton(x, w, None, [A], [B], [1.0], [0.0], False)
        ref = lora_linear_reference(x.double(), Int8Weight(CB, SCB.double()), None,
                                    [A.double()], [B.double()], [1.0], [0.0], False)
        assert (y.double() - ref).abs().max() < 1e-3 * ref.abs().max()


def test_empty_batch_and_no_adapters():
    W, b = torch.randn(6, 5), torch.randn(6, requires_grad=True)
    x = torch.randn(0, 5, requires_grad=True)
    y = lora_linear(x, W, b, [torch.randn(2, 5)], [torch.randn(6, 2)], [1.0], [0.0], True, backend="triton")
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 5) and torch.equal(b.grad, torch.zeros(6))
    run_case(M=9, K=5, N=6, dtype=torch.float32, ranks=[], scales=[], ps=[], trainable=[])


def _args(**over):
    K, N, r = 8, 6, 2
    args = dict(x=torch.randn(3, K), weight=torch.randn(N, K), bias=torch.randn(N),
                lora_A=[torch.randn(r, K)], lora_B=[torch.randn(N, r)], scales=[1.0], dropout=[0.1])
    args.update(over)
    return args


BAD = {
    "x.dtype": (_args(x=torch.randn(3, 8, dtype=torch.float64)), "x.dtype"),
    "x int": (_args(x=torch.ones(3, 8, dtype=torch.int32)), "x.dtype"),
    "K mismatch": (_args(x=torch.randn(3, 7)), "last dim 7"),
    "rank 0": (_args(lora_A=[torch.randn(0, 8)], lora_B=[torch.randn(6, 0)]), "lora_A[0]"),
    "rank 257": (_args(lora_A=[torch.randn(257, 8)], lora_B=[torch.randn(6, 257)]), "lora_A[0]"),
    "B shape": (_args(lora_B=[torch.randn(6, 3)]), "lora_B[0]"),
    "lengths": (_args(scales=[1.0, 2.0]), "lengths"),
    "dropout 1": (_args(dropout=[1.0]), "dropout[0]"),
    "dropout < 0": (_args(dropout=[-0.1]), "dropout[0]"),
    "scale nan": (_args(scales=[float("nan")]), "scales[0]"),
    "scale tensor": (_args(scales=[torch.tensor(1.0)]), "scales[0]"),
    "bias shape": (_args(bias=torch.randn(5)), "bias"),
    "trainable weight": (_args(weight=torch.randn(6, 8, requires_grad=True)), "frozen"),
    "CB float": (_args(weight=Int8Weight(torch.randn(6, 8), torch.rand(6))), "CB"),
    "SCB shape": (_args(weight=Int8Weight(torch.ones(6, 8, dtype=torch.int8), torch.rand(5))), "SCB"),
    "weight 1-D": (_args(weight=torch.randn(8)), "weight"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error(name):
    args, match = BAD[name]
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        lt.lora_linear_triton(**args, training=True)


def test_lora_linear_module_on_triton_matches_torch():
    from fastfair.lora import LoRALinear

    torch.manual_seed(1)
    base = torch.nn.Linear(30, 20)
    m = LoRALinear(base, r=6, alpha=12, backend="triton")
    m.add_adapter("frozen", r=3, alpha=3, trainable=False)
    with torch.no_grad():
        for B in m.lora_B.values():
            B.normal_()
    x = torch.randn(2, 7, 30, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in (m.lora_A["default"], m.lora_B["default"])]
    assert m.lora_A["frozen"].grad is None and base.weight.grad is None
    x.grad = None
    m.zero_grad()
    m.backend = "torch"
    y_ref = m(x)
    y_ref.square().sum().backward()
    ref = [x.grad] + [p.grad for p in (m.lora_A["default"], m.lora_B["default"])]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("design", ld.TRITON_DESIGNS)
def test_rank_256_at_tiny_shapes(monkeypatch, design):
    # Rank past BLOCK_R: several rank blocks in lora_down/lora_dA and several rank chunks inside
    # one adapter's masked block in the dX kernel; M, K, N far below one tile.
    force(monkeypatch, design)
    run_case(M=3, K=5, N=7, dtype=torch.float32, ranks=[256, 7], scales=[0.5, -2.0], ps=[0.5, 0.25],
             trainable=[True, True], layout="strided")


def test_fp16_large_reduction():
    # K and N of a ViT layer in fp16: the sums must be accumulated in fp32 to stay within 1e-2.
    run_case(M=4, K=768, N=40, dtype=torch.float16, ranks=[16], scales=[2.0], ps=[0.1],
             trainable=[True], bias="trainable")


@pytest.mark.parametrize("design", ["fused", "fused_inloop", "cublas"])
def test_forward_keeps_its_draw_and_backward_reads_only_that(design):
    # The masks are drawn once, in the forward, and stored 1 bit per element; dX and dA must use
    # exactly the stored bits: given other bits, backward must follow them, not a redraw from the seed.
    from fastfair.ops.lora import pack_bits, torch_backward, unpack_bits

    torch.manual_seed(3)
    M, K, N, ps, ranks = 37, 45, 29, [0.4, 0.0, 0.2], [3, 5, 2]
    x, W, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    A = [torch.randn(r, K) for r in ranks]
    B = [torch.randn(N, r) for r in ranks]
    scales = [0.5, 2.0, -1.0]
    seed = torch.tensor([SEED])
    y, xa, masks = lt.op_forward(x, W, None, bias, A, B, scales, ps, seed, design, "dequant")
    assert masks.dtype == torch.uint8 and masks.shape == (3, M, (K + 7) // 8)
    for a, p in enumerate(ps):
        want = dropout_mask(SEED, M, K, p, a, "cpu") if p > 0 else torch.ones(M, K, dtype=torch.bool)
        assert torch.equal(unpack_bits(masks[a], K), want), a
    other = pack_bits(torch.rand(3, M, K) >= 0.5)
    other[1] = 255  # the adapter without dropout keeps everything
    dy = torch.randn(M, N)
    needs = [True, True, True, True, True, True, True, True]
    got = lt.op_backward(dy, x, W, None, A, B, xa, other, seed, scales, ps, design, "dequant", needs)
    d64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    ref = torch_backward(dy.double(), x.double(), W.double(), None, d64(A), d64(B), xa.double(), other, scales,
                         ps, False, needs)
    assert torch.allclose(got[0].double(), ref[0], atol=1e-3, rtol=1e-3)  # dX
    for g, r in zip(got[2] + got[3], ref[2] + ref[3]):  # dA, dB
        assert torch.allclose(g.double(), r, atol=1e-3, rtol=1e-3)
    same = lt.op_backward(dy, x, W, None, A, B, xa, masks, seed, scales, ps, design, "dequant", needs)
    assert not torch.allclose(same[2][0], got[2][0], atol=1e-3)  # the bits, not the seed, decide dA


@given(M=st.integers(1, 70), N=st.integers(1, 70), R=st.integers(1, 40), half=st.booleans())
def test_g_and_dB_from_one_read_of_dy_match_two_gemms(M, N, R, half):
    from fastfair.kernels.lora import lora_g_db

    dt = torch.float16 if half else torch.float32
    gen = torch.Generator().manual_seed(M * 10_000 + N * 100 + R)
    dy, B_s, xa = (torch.randn(*s, generator=gen).to(dt) for s in ((M, N), (N, R), (M, R)))
    g = torch.full((M, R), float("nan"), dtype=dt)  # every element must be written
    db = torch.zeros((N, R))
    lora_g_db(dy, B_s, xa, g, db)
    tol = TOL[dt] * max(1.0, math.sqrt(N))
    assert torch.allclose(g.double(), dy.double() @ B_s.double(), atol=tol, rtol=tol)
    assert torch.allclose(db.double(), dy.double().t() @ xa.double(), atol=tol * math.sqrt(M), rtol=tol)


def test_merged_backward_takes_g_and_dB_from_the_fused_pass(monkeypatch):
    # On CUDA the merged design's backward reads dY once for g and dB; here the same branch runs
    # under the interpreter and must give the two-GEMM result.
    from fastfair.kernels import lora as kl
    from fastfair.ops import lora as ol

    torch.manual_seed(5)
    M, K, N = 40, 24, 36
    x, W, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
    A, B = [torch.randn(6, K), torch.randn(3, K)], [torch.randn(N, 6), torch.randn(N, 3)]
    _, xa, masks = ol.torch_forward(x, W, None, None, A, B, [0.5, 2.0], [0.0, 0.0], None, True)
    needs = [True, False, True, True, True, True]
    want = ol.torch_backward(dy, x, W, None, A, B, xa, masks, [0.5, 2.0], [0.0, 0.0], True, needs)
    calls, real = [], kl.lora_g_db
    monkeypatch.setattr(ol, "_fused_g_db", lambda dy2, R: True)
    monkeypatch.setattr(kl, "lora_g_db", lambda *a: calls.append(1) or real(*a))
    got = ol.torch_backward(dy, x, W, None, A, B, xa, masks, [0.5, 2.0], [0.0, 0.0], True, needs)
    assert calls == [1]
    for g, w in zip([got[0], *got[2], *got[3]], [want[0], *want[2], *want[3]]):
        assert torch.allclose(g, w, atol=1e-3, rtol=1e-4)
