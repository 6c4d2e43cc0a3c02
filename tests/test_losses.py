"""FairnessLoss against penalties written out by hand in float64."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from fastfair.losses import FairnessLoss, FairnessLossOutput

PENALTIES = ["variance", "std", "range", "worst", "cvar"]


def by_hand(x, y, g, G, penalty, lam=1.0, alpha=0.5, q=None, step=0.01, ignore_index=-100):
    """(loss, ce, penalty, group means dict, new q) in float64, row by row and group by group."""
    x = x.double()
    used = [i for i in range(len(y)) if int(y[i]) != ignore_index]
    row = {i: torch.logsumexp(x[i], 0) - x[i, int(y[i])] for i in used}
    ce = sum(row.values()) / len(used) if used else x.new_zeros(())
    present = sorted({int(g[i]) for i in used})
    L = {k: sum(row[i] for i in used if int(g[i]) == k) / sum(1 for i in used if int(g[i]) == k)
         for k in present}
    new_q = None
    if penalty == "worst":
        new_q = [float(q[k]) * (math.exp(step * float(L[k].detach())) if k in L else 1.0) for k in range(G)]
        new_q = [v / sum(new_q) for v in new_q]
    if len(present) < 2:
        pen = x.new_zeros(())
    else:
        vals = [L[k] for k in present]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)  # population variance
        if penalty == "variance":
            pen = var
        elif penalty == "std":
            pen = var.sqrt()
        elif penalty == "range":
            pen = max(vals) - min(vals)
        elif penalty == "cvar":
            worst = sorted(vals, key=lambda v: float(v.detach()), reverse=True)
            budget, pen = alpha * len(vals), 0.0
            for v in worst:
                take = min(1.0, budget)
                if take <= 0:
                    break
                pen, budget = pen + take * v, budget - take
            pen = pen / (alpha * len(vals))
        else:
            pen = sum(new_q[k] * L[k] for k in present) / sum(new_q[k] for k in present)
    return ce + lam * pen, ce, pen, L, new_q


@st.composite
def batches(draw):
    N = draw(st.integers(2, 10))
    C = draw(st.integers(2, 6))
    G = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < draw(st.sampled_from([0.0, 0.3]))] = -100
    g = torch.randint(0, G, (N,), generator=gen)
    alpha = draw(st.sampled_from([0.25, 0.5, 0.7, 1.0]))
    return x, y, g, G, alpha


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("penalty", PENALTIES)
@given(batches())
def test_matches_hand_computed_float64(penalty, backend, batch):
    x, y, g, G, alpha = batch
    lam = 0.7
    fn = FairnessLoss(G, lam=lam, penalty=penalty, alpha=alpha, step_size=0.5, backend=backend)
    q0 = fn.dro_q.clone() if penalty == "worst" else None
    xg = x.clone().requires_grad_()
    out = fn(xg, y, g)
    assert isinstance(out, FairnessLossOutput)
    out.loss.backward()

    x64 = x.double().requires_grad_()
    loss, ce, pen, L, new_q = by_hand(x64, y, g, G, penalty, lam, alpha, q0, step=0.5)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss.detach(), **tol)
    torch.testing.assert_close(out.ce.double(), ce.detach(), **tol)
    torch.testing.assert_close(out.penalty.double(), torch.as_tensor(pen).double().detach(), **tol)
    for k in range(G):
        if k in L:
            torch.testing.assert_close(out.group_loss[k].double(), L[k].detach(), **tol)
            assert out.group_count[k] == sum(1 for i in range(len(y)) if y[i] != -100 and g[i] == k)
        else:
            assert math.isnan(out.group_loss[k]) and out.group_count[k] == 0
    if penalty == "worst":
        torch.testing.assert_close(fn.dro_q.double(), torch.tensor(new_q, dtype=torch.float64), **tol)
    if loss.requires_grad:
        (truth,) = torch.autograd.grad(loss, x64)
        torch.testing.assert_close(xg.grad.double(), truth, **tol)
    else:  # every row ignored: nothing to learn from
        assert (xg.grad == 0).all()


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("case", ["one_group", "all_ignored", "equal_groups"])
def test_degenerate_batches_give_zero_penalty_and_finite_gradients(penalty, case):
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    g = torch.tensor([1, 1, 1, 1])
    if case == "all_ignored":
        y = torch.full((4,), -100)
    if case == "equal_groups":  # two groups with identical losses: variance 0, sqrt'(0) = inf
        x = torch.cat([x[:2], x[:2]])
        y = torch.tensor([0, 1, 0, 1])
        g = torch.tensor([0, 0, 2, 2])
    x.requires_grad_()
    out = FairnessLoss(3, lam=2.0, penalty=penalty)(x, y, g)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()
    if case != "equal_groups" or penalty in ("variance", "std", "range"):
        assert out.penalty.item() == pytest.approx(0.0, abs=1e-7)
    if case == "all_ignored":
        assert out.loss.item() == 0 and (x.grad == 0).all() and out.group_count.sum() == 0
    if case == "one_group":
        assert torch.isnan(out.group_loss[[0, 2]]).all() and out.group_count.tolist() == [0, 4, 0]


def test_cvar_counts_the_boundary_group_fractionally():
    # Three groups, one row each, alpha = 0.5: the worst group plus half the second, over 1.5.
    x = torch.tensor([[0.0, 3.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    out = FairnessLoss(3, penalty="cvar", alpha=0.5, backend="torch")(x, y, torch.arange(3))
    L = [math.log1p(math.exp(3.0)), math.log1p(math.exp(1.0)), math.log1p(math.exp(-2.0))]
    assert out.penalty.item() == pytest.approx((L[0] + 0.5 * L[1]) / 1.5)


def test_groupdro_state_updates_in_training_only_and_is_checkpointed():
    torch.manual_seed(0)
    G, step = 3, 0.3
    fn = FairnessLoss(G, penalty="worst", step_size=step)
    q = [1 / 3] * 3
    for _ in range(2):
        x = torch.randn(6, 4)
        y = torch.randint(0, 4, (6,))
        g = torch.tensor([0, 0, 1, 1, 1, 0])  # group 2 absent: its weight only renormalizes
        out = fn(x, y, g)
        q = [q[k] * (math.exp(step * out.group_loss[k].item()) if k < 2 else 1.0) for k in range(G)]
        q = [v / sum(q) for v in q]
        assert fn.dro_q.tolist() == pytest.approx(q, rel=1e-6)
        w = q[0] + q[1]
        assert out.penalty.item() == pytest.approx(
            (q[0] * out.group_loss[0].item() + q[1] * out.group_loss[1].item()) / w, rel=1e-6)
    fn.eval()
    fn(x, y, g)
    assert fn.dro_q.tolist() == pytest.approx(q, rel=1e-6)
    fresh = FairnessLoss(G, penalty="worst")
    fresh.load_state_dict(fn.state_dict())
    assert torch.equal(fresh.dro_q, fn.dro_q)
    assert "flags" not in fn.state_dict()
    fn.train()
    x[0, 0] = float("nan")
    fn(x, y, g)  # a NaN group loss must not poison the weights
    assert fn.dro_q.tolist() == pytest.approx(q, rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_rows_make_the_loss_nan_until_check(backend):
    fn = FairnessLoss(2, backend=backend)
    x = torch.randn(4, 3, requires_grad=True)
    good_y, g = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1])
    out = fn(x, torch.tensor([0, 1, 3, 0]), g)  # row 2: label 3 with 3 classes
    assert math.isnan(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all()
    assert math.isnan(fn(x, good_y, g).loss.item())  # still NaN: not checked yet
    with pytest.raises(ValueError, match=r"first at row 2 \(label = 3\)"):
        fn.check()
    assert math.isfinite(fn(x, good_y, g).loss.item())
    fn.check()


def test_validate_true_raises_before_computing():
    fn = FairnessLoss(2, validate=True)
    with pytest.raises(ValueError, match=r"groups\[1\] = 2 is outside \[0, 2\)"):
        fn(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_nan_logits_give_nan_loss(penalty):
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    out = FairnessLoss(2, penalty=penalty)(x, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1]))
    assert math.isnan(out.loss.item())


def test_std_penalty_of_a_nan_variance_is_nan_not_zero():
    fn = FairnessLoss(3, penalty="std")
    L = torch.tensor([1.0, float("nan"), 2.0])
    present = torch.tensor([True, True, True])
    assert math.isnan(fn._penalty(L, present, present.sum(), torch.tensor(0.0)).item())
    # an exact 0 still gives 0 with a finite gradient
    L0 = torch.tensor([1.5, 1.5, 1.5], requires_grad=True)
    pen = fn._penalty(L0, present, present.sum(), torch.tensor(0.0))
    pen.backward()
    assert pen.item() == 0.0 and torch.isfinite(L0.grad).all()


def test_none_penalty_is_mean_cross_entropy():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, -100, 3, 2])
    out = FairnessLoss(2, penalty="none", lam=5.0)(x, y, torch.tensor([0, 1, 1, 0, 0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(x, y))


@pytest.mark.parametrize("kw, match", [
    (dict(num_groups=0), "num_groups"),
    (dict(penalty="max"), "penalty must be one of"),
    (dict(lam=-1.0), "lam"),
    (dict(alpha=0.0), "alpha"),
    (dict(step_size=-0.1), "step_size"),
    (dict(lam=float("inf")), "lam must be a finite number >= 0, got inf"),
    (dict(lam=float("nan")), "lam.*got nan"),
    (dict(alpha=float("inf")), "alpha.*got inf"),
    (dict(step_size=float("inf")), "step_size must be a finite number >= 0, got inf"),
    (dict(step_size=float("nan")), "step_size.*got nan"),
    (dict(label_smoothing=2.0), "label_smoothing"),
    (dict(backend="gpu"), "backend"),
])
def test_constructor_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        FairnessLoss(**{"num_groups": 2, **kw})
