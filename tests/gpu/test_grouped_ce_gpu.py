"""grouped_cross_entropy on CUDA: bf16/fp16/fp32 at real sizes against float64."""
import pytest
import torch

from fastfair.losses import FairnessLoss
from fastfair.ops.grouped_ce import check_flags, grouped_cross_entropy, new_flags

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def data(N, C, G, dtype, seed=0, p_ignore=0.05):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(N, C, device="cuda", generator=gen) * 4).to(dtype)
    y = torch.randint(0, C, (N,), device="cuda", generator=gen)
    y[torch.rand(N, device="cuda", generator=gen) < p_ignore] = -100
    g = torch.randint(0, G, (N,), device="cuda", generator=gen)
    return x, y, g


def truth64(x, y, g, G, eps, wl, ws):
    """float64 loss, group sums/counts and d(Σ wl·loss + Σ ws·gsum)/dx, from log-softmax."""
    x64 = x.double()
    used = y != -100
    logp = torch.log_softmax(x64, 1)
    nll = -logp.gather(1, torch.where(used, y, 0)[:, None])[:, 0]
    loss = torch.where(used, (1 - eps) * nll - eps * logp.mean(1), 0.0)
    gi = torch.where(used, g, 0)
    gsum = torch.zeros(G, dtype=torch.float64, device="cuda").index_add(0, gi, loss)
    gcnt = torch.zeros(G, dtype=torch.float64, device="cuda").index_add(0, gi, used.double())
    coef = torch.where(used, wl.double() + ws.double()[gi], 0.0)
    target = torch.nn.functional.one_hot(torch.where(used, y, 0), x.shape[1]).double() * (1 - eps) + eps / x.shape[1]
    grad = coef[:, None] * (logp.exp() - target)
    return loss, gsum, gcnt, grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N, C, G", [(65536, 2, 4), (4096, 1000, 16), (1024, 32000, 3),
                                     (256, 131072, 2), (64, 262144, 100)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_float64(dtype, N, C, G, eps):
    x, y, g = data(N, C, G, dtype)
    wl = torch.randn(N, device="cuda")
    ws = torch.randn(G, device="cuda")
    xr = x.clone().requires_grad_()
    before = x.clone()
    loss, gsum, gcnt = grouped_cross_entropy(xr, y, g, G, label_smoothing=eps)
    ((loss * wl).sum() + (gsum * ws).sum()).backward()
    tl, ts, tc, tg = truth64(x, y, g, G, eps, wl, ws)
    assert loss.dtype == gsum.dtype == torch.float32
    torch.testing.assert_close(loss.double(), tl, rtol=1e-5, atol=1e-4)
    # fp32 accumulation: the group sums stay within fp32 rounding of float64 whatever the dtype.
    torch.testing.assert_close(gsum.double(), ts, rtol=1e-5, atol=1e-3)
    assert torch.equal(gcnt.double(), tc)
    assert xr.grad.dtype == dtype
    gtol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(xr.grad.double(), tg, rtol=gtol, atol=gtol)
    assert torch.equal(x, before)


def test_offsets_past_two_to_the_31():
    # 16400 × 131072 bf16 elements > 2³¹: the last rows are only right with int64 offsets.
    N, C = 16400, 131072
    x, y, g = data(N, C, 2, torch.bfloat16, p_ignore=0.0)
    loss, gsum, _ = grouped_cross_entropy(x, y, g, 2, validate=False)
    tail = slice(N - 8, N)
    ref = torch.nn.functional.cross_entropy(x[tail].double(), y[tail], reduction="none")
    torch.testing.assert_close(loss[tail].double(), ref, rtol=1e-5, atol=1e-4)
    check_flags()


def test_bad_rows_flagged_without_sync_and_raised_later():
    x, y, g = data(1000, 50, 3, torch.bfloat16, p_ignore=0.0)
    y[17] = 50
    flags = new_flags("cuda")
    loss, gsum, gcnt = grouped_cross_entropy(x, y, g, 3, validate=False, flags=flags)
    assert torch.isnan(loss[17]) and torch.isfinite(gsum).all() and gcnt.sum() == 999
    with pytest.raises(ValueError, match=r"first at row 17 \(label = 50\)"):
        check_flags(flags)


@pytest.mark.parametrize("penalty", ["variance", "worst", "cvar"])
def test_fairness_loss_matches_reference_backend(penalty):
    x, y, g = data(4096, 1000, 4, torch.bfloat16)
    outs = []
    for backend in ("triton", "torch"):
        xr = x.clone().requires_grad_()
        out = FairnessLoss(4, lam=1.0, penalty=penalty, backend=backend).cuda()(xr, y, g)
        out.loss.backward()
        outs.append((out, xr.grad.float()))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.group_loss, b.group_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("penalty", ["variance", "std", "range", "worst", "cvar"])
def test_fairness_loss_step_has_no_host_sync(penalty):
    x, y, g = data(4096, 1000, 4, torch.bfloat16)
    loss_fn = FairnessLoss(4, lam=1.0, penalty=penalty).cuda()

    def step():
        xr = x.clone().requires_grad_()
        loss_fn(xr, y, g).loss.backward()

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
