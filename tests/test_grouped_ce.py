"""grouped_cross_entropy: Triton path (interpreter on CPU) and torch path vs a float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from fastfair.kernels import _utils
from fastfair.ops.grouped_ce import (
    check_flags, grouped_cross_entropy, grouped_cross_entropy_reference, new_flags,
)

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Buffers the kernels must fully write start as NaN, so an unwritten element shows."""
    def empty(shape, dtype, device):
        return torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan"),
                          dtype=dtype, device=device)
    monkeypatch.setattr(_utils, "alloc", empty)


def float64_truth(x, y, g, G, ignore_index=-100, eps=0.0, w_loss=None, w_sum=None):
    """Loss, group sums/counts and d(Σ w_loss·loss + Σ w_sum·group_sum)/dx, all in float64,
    written from the definition (log-softmax) rather than through the code under test."""
    x = x.detach().double().requires_grad_()
    N, C = x.shape
    used = y != ignore_index
    logp = torch.log_softmax(x, dim=1)
    y_safe = torch.where(used, y, 0).long()
    nll = -logp.gather(1, y_safe[:, None])[:, 0]
    smooth = -logp.mean(dim=1)
    loss = torch.where(used, (1 - eps) * nll + eps * smooth, 0.0)
    onehot = F.one_hot(torch.where(used, g, 0).long(), G).double() * used[:, None]
    gsum, gcnt = onehot.T @ loss, onehot.sum(0)
    obj = (loss * w_loss.double()).sum() + (gsum * w_sum.double()).sum()
    (grad,) = torch.autograd.grad(obj, x)
    return loss.detach(), gsum.detach(), gcnt, grad


def run(backend, x, y, g, G, eps=0.0, w_loss=None, w_sum=None, **kw):
    x = x.clone().requires_grad_()
    loss, gsum, gcnt = grouped_cross_entropy(x, y, g, G, label_smoothing=eps, backend=backend, **kw)
    (loss * w_loss).sum().add((gsum * w_sum).sum()).backward()
    return loss, gsum, gcnt, x.grad


@st.composite
def batches(draw):
    N = draw(st.integers(1, 6))
    C = draw(st.sampled_from([2, 3, 7, 33, 100, 1000]))
    G = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    p_ignore = draw(st.sampled_from([0.0, 0.3, 1.0]))
    eps = draw(st.sampled_from([0.0, 0.1]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    return N, C, G, seed, p_ignore, eps, dtype


def make(N, C, G, seed, p_ignore=0.0, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen) * scale).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < p_ignore] = -100
    # Groups drawn from a subset so some groups are empty.
    g = torch.randint(0, max(1, G - 1), (N,), generator=gen) if G > 2 else torch.randint(0, G, (N,), generator=gen)
    w_loss = torch.randn(N, generator=gen)
    w_sum = torch.randn(G, generator=gen)
    return x, y, g, w_loss, w_sum


def assert_matches(got, truth, dtype):
    loss, gsum, gcnt, grad = got
    tl, ts, tc, tg = truth
    assert loss.dtype == gsum.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss.double(), tl, **tol)
    torch.testing.assert_close(gsum.double(), ts, **tol)
    assert torch.equal(gcnt.double(), tc)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), tg, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@given(batches())
@example((3, 5, 1, 0, 0.0, 0.0, torch.float32))  # one group
@example((4, 7, 3, 1, 1.0, 0.1, torch.float32))  # every row ignored
@example((5, 3, 5, 2, 0.0, 0.1, torch.float16))  # empty groups, smoothing, fp16
@example((6, 7, 3, 11, 0.3, 0.1, torch.float32))  # smoothing and an ignored row together
def test_matches_float64_reference(backend, batch):
    N, C, G, seed, p_ignore, eps, dtype = batch
    x, y, g, wl, ws = make(N, C, G, seed, p_ignore, dtype)
    truth = float64_truth(x, y, g, G, eps=eps, w_loss=wl, w_sum=ws)
    assert_matches(run(backend, x, y, g, G, eps, wl, ws), truth, dtype)


@pytest.mark.parametrize("C", [4097, 9000])  # 2 and 3 column blocks, not powers of two
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_large_C_online_logsumexp(C, eps):
    x, y, g, wl, ws = make(3, C, 2, C, scale=4.0)
    # The row maximum sits in a later block, so the running sum must be rescaled.
    x[0, C - 5] = 40.0
    y[1] = C - 1
    truth = float64_truth(x, y, g, 2, eps=eps, w_loss=wl, w_sum=ws)
    assert_matches(run("triton", x, y, g, 2, eps, wl, ws), truth, torch.float32)


def test_many_groups_use_per_row_atomics():
    G = 100  # past the one-hot tile reduction
    x, y, g, wl, ws = make(40, 5, G, 3)
    g = torch.randint(0, G, (40,), generator=torch.Generator().manual_seed(4))
    truth = float64_truth(x, y, g, G, w_loss=wl, w_sum=ws)
    assert_matches(run("triton", x, y, g, G, 0.0, wl, ws), truth, torch.float32)


def test_many_rows_small_C_span_several_programs():
    x, y, g, wl, ws = make(300, 2, 3, 5, p_ignore=0.2)
    truth = float64_truth(x, y, g, 3, w_loss=wl, w_sum=ws)
    assert_matches(run("triton", x, y, g, 3, 0.0, wl, ws), truth, torch.float32)


@pytest.mark.parametrize("which", ["loss", "sum"])
def test_gradient_through_one_output_only(which):
    x, y, g, wl, ws = make(5, 11, 3, 6)
    xr = x.clone().requires_grad_()
    loss, gsum, _ = grouped_cross_entropy(xr, y, g, 3, backend="triton")
    out, w = (loss, wl) if which == "loss" else (gsum, ws)
    (grad,) = torch.autograd.grad((out * w).sum(), xr)
    zl, zs = (wl, torch.zeros(3)) if which == "loss" else (torch.zeros(5), ws)
    truth = float64_truth(x, y, g, 3, w_loss=zl, w_sum=zs)[3]
    torch.testing.assert_close(grad.double(), truth, rtol=1e-5, atol=1e-6)


def test_strided_rows_and_labels_and_int32_labels():
    base, y, g, wl, ws = make(4, 12, 2, 7)
    x = base[:, :9]  # row stride 12, 9 classes
    y = torch.stack([y % 9, y.flip(0) % 9], 1).to(torch.int32)[:, 0]  # labels with stride 2
    g = torch.stack([g, 1 - g], 1)[:, 0]
    assert y.stride(0) == 2 and g.stride(0) == 2
    truth = float64_truth(x, y, g.to(torch.int32), 2, w_loss=wl, w_sum=ws)
    assert_matches(run("triton", x, y, g.to(torch.int32), 2, 0.0, wl, ws), truth, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_does_not_touch_logits(backend):
    x, y, g, _, _ = make(4, 9, 2, 8)
    x.requires_grad_()
    before = x.detach().clone()
    loss, gsum, _ = grouped_cross_entropy(x, y, g, 2, backend=backend)
    (loss.sum() + gsum.sum()).backward()
    assert torch.equal(x.detach(), before)
    assert x.grad.data_ptr() != x.data_ptr()
    # Logits reused after backward give the same loss again (liger-kernel issue #272).
    again, _, _ = grouped_cross_entropy(x.detach(), y, g, 2, backend=backend)
    torch.testing.assert_close(again, loss.detach())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_give_nan_loss(backend):
    x = torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 3, 4])
    g = torch.zeros(5, dtype=torch.long)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[2, 2] = float("inf")  # at the label
    x[3, 0] = float("-inf")  # a masked class: finite loss
    loss, gsum, _ = grouped_cross_entropy(x, y, g, 1, backend=backend)
    assert torch.isnan(loss[:3]).all()
    assert torch.isnan(gsum).all()
    ref = F.cross_entropy(x[3:], y[3:], reduction="none")
    assert torch.isfinite(loss[3:]).all()
    torch.testing.assert_close(loss[3:], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_in_an_ignored_row_do_not_leak(backend):
    x = torch.randn(3, 4)
    x[1] = float("nan")
    y = torch.tensor([0, -100, 2])
    loss, gsum, gcnt = grouped_cross_entropy(x, y, torch.zeros(3, dtype=torch.long), 1, backend=backend)
    assert loss[1] == 0 and torch.isfinite(gsum).all() and gcnt.item() == 2


def _err(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        grouped_cross_entropy(*args, **kw)


def test_value_errors():
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    g = torch.tensor([0, 1, 0, 1])
    _err("floating", x.long(), y, g, 2)
    _err(r"\[N, C\]", x[0], y, g, 2)
    _err("at least one class", torch.randn(4, 0), y, g, 2)
    _err("labels must have an integer dtype", x, y.float(), g, 2)
    _err("groups must have an integer dtype", x, y, g.bool(), 2)
    _err("labels must be a 1-D", x, y[:, None], g, 2)
    _err("labels has 3 rows but logits has 4", x, y[:3], g, 2)
    _err("groups has 5 rows", x, y, torch.zeros(5, dtype=torch.long), 2)
    _err("groups is on meta", x, y, g.to("meta"), 2)
    _err("num_groups", x, y, g, 0)
    _err("num_groups", x, y, g, 2.0)
    _err("ignore_index", x, y, g, 2, ignore_index=1.5)
    _err("label_smoothing", x, y, g, 2, label_smoothing=1.5)
    _err("backend must be one of", x, y, g, 2, backend="cuda")
    _err("flags must be new_flags", x, y, g, 2, flags=torch.zeros(3, dtype=torch.long))
    _err(r"labels\[2\] = 5 is outside \[0, 5\)", x, torch.tensor([0, 1, 5, 3]), g, 2)
    _err(r"labels\[1\] = -1 is outside", x, torch.tensor([0, -1, 2, 3]), g, 2)
    _err(r"groups\[3\] = 2 is outside \[0, 2\)", x, y, torch.tensor([0, 1, 0, 2]), 2)
    _err(r"groups\[0\] = -4", x, y, torch.tensor([-4, 1, 0, 1]), 2)
    _err("float64; use backend='torch'", x.double(), y, g, 2, backend="triton")
    # A bad group on an ignored row is not an error: the row is not used.
    grouped_cross_entropy(x, torch.tensor([0, -100, 2, 3]), torch.tensor([0, 9, 0, 1]), 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_masks_flags_and_raises_later(backend):
    x, _, _, _, _ = make(6, 5, 2, 9)
    y = torch.tensor([1, 7, 2, -100, -2, 4])
    g = torch.tensor([0, 1, 3, 5, 0, 1])
    flags = new_flags()
    x.requires_grad_()
    loss, gsum, gcnt = grouped_cross_entropy(x, y, g, 2, validate=False, backend=backend, flags=flags)
    bad = torch.tensor([False, True, True, False, True, False])
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    ok = ~bad & (y != -100)
    truth = F.cross_entropy(x.detach()[ok], y[ok], reduction="none")
    torch.testing.assert_close(gsum.detach(), torch.stack([truth[0], truth[1]]))
    assert gcnt.tolist() == [1.0, 1.0]
    gsum.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[bad] == 0).all()
    with pytest.raises(ValueError, match=r"2 row\(s\) with a label out of range, the first at row 1 "
                       r"\(label = 7\); 1 row\(s\) with a group out of range, the first at row 2 \(group = 3\)"):
        check_flags(flags)
    check_flags(flags)  # reset by the first check


def test_flags_accumulate_and_keep_the_first_row_across_calls():
    x = torch.randn(4, 3)
    flags = new_flags()
    for y in (torch.tensor([0, 1, 2, 9]), torch.tensor([0, 5, 1, 2])):
        grouped_cross_entropy(x, y, torch.zeros(4, dtype=torch.long), 1, validate=False,
                              backend="triton", flags=flags)
    with pytest.raises(ValueError, match=r"2 row\(s\) .* first at row 1 \(label = 5\)"):
        check_flags(flags, reset=False)
    with pytest.raises(ValueError):
        check_flags(flags)  # not reset above


def test_default_flags_buffer_and_huge_values_saturate():
    check_flags()  # clear whatever earlier calls left
    x = torch.randn(2, 3)
    grouped_cross_entropy(x, torch.tensor([0, 2**40]), torch.zeros(2, dtype=torch.long), 1,
                          validate=False, backend="triton")
    with pytest.raises(ValueError, match=r"row 1 \(label = 2147483647\)"):
        check_flags()
    check_flags()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 4, requires_grad=True)
    e = torch.zeros(0, dtype=torch.long)
    loss, gsum, gcnt = grouped_cross_entropy(x, e, e, 3, backend=backend)
    assert loss.shape == (0,) and gsum.tolist() == [0.0] * 3 and gcnt.tolist() == [0.0] * 3
    gsum.sum().backward()
    assert x.grad.shape == (0, 4)


def test_reference_keeps_float64():
    x = torch.randn(3, 4, dtype=torch.float64)
    loss, gsum, gcnt = grouped_cross_entropy_reference(x, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), 2)
    assert loss.dtype == gsum.dtype == torch.float64
    assert math.isclose(gsum.sum().item(), F.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="sum").item())
