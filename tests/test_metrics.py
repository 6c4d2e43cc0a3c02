"""fastfair.metrics against fairlearn and scikit-learn, streaming, two processes, edge cases."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
)
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

from fastfair.metrics import (
    GroupMetrics,
    bootstrap,
    ci_keys,
    compute_metrics,
    intersect_group_names,
    intersect_groups,
)

TOL = 1e-6


def _data(n, G, C, seed, ties, every_cell=True):
    """Random probabilities; the first G*C rows put every class in every group."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, G, n)
    labels = rng.integers(0, C, n)
    if every_cell:
        k = np.arange(G * C)
        groups[: G * C], labels[: G * C] = k // C, k % C
    probs = rng.dirichlet(np.ones(C), n)
    if ties:  # coarse scores, so AUC has to get tied ranks right; none 0 (log_loss clips there)
        probs = np.round(probs * 4)
        probs = (0.8 * probs / probs.sum(1, keepdims=True).clip(1)) + 0.2 / C
        probs /= probs.sum(1, keepdims=True)
    return probs, labels, groups


def _ece_reference(probs, labels, n_bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inb = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if inb.any():
            total += inb.mean() * abs((pred[inb] == labels[inb]).mean() - conf[inb].mean())
    return total


def _close(a, b):
    assert a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=TOL), (a, b)


@given(n=st.integers(12, 150), G=st.integers(1, 5), seed=st.integers(0, 2**31), ties=st.booleans())
def test_binary_matches_fairlearn_and_sklearn(n, G, seed, ties):
    probs, y, g = _data(n + 2 * G, G, 2, seed, ties)
    pred = probs.argmax(1)
    m = compute_metrics(probs, y, g, G, 2)

    mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=g)
    for k in range(G):
        _close(m["group_accuracy"][k], mf.by_group[k])
        gi = g == k
        _close(m["group_auc"][k], roc_auc_score(y[gi], probs[gi, 1]))
        _close(m["group_ece"][k], _ece_reference(probs[gi], y[gi]))
        _close(m["group_loss"][k], log_loss(y[gi], probs[gi], labels=[0, 1]))
    assert m["group_count"] == np.bincount(g, minlength=G).tolist()
    _close(m["worst_group_accuracy"], mf.group_min())
    _close(m["accuracy_gap"], mf.difference())
    _close(m["accuracy"], accuracy_score(y, pred))
    _close(m["balanced_accuracy"], balanced_accuracy_score(y, pred))
    _close(m["auc"], roc_auc_score(y, probs[:, 1]))
    aucs = [roc_auc_score(y[g == k], probs[g == k, 1]) for k in range(G)]
    _close(m["worst_group_auc"], min(aucs))
    _close(m["auc_gap"], max(aucs) - min(aucs))
    kw = dict(sensitive_features=g)
    _close(m["demographic_parity_difference"], demographic_parity_difference(y, pred, **kw))
    _close(m["equalized_odds_difference"], equalized_odds_difference(y, pred, **kw))
    _close(m["equal_opportunity_difference"], equal_opportunity_difference(y, pred, **kw))
    losses = [log_loss(y[g == k], probs[g == k], labels=[0, 1]) for k in range(G)]
    _close(m["loss_variance"], float(np.var(losses)))
    assert m["missing_groups"] == [] and m["notes"] == []


@given(n=st.integers(0, 120), G=st.integers(1, 4), C=st.integers(3, 5),
       seed=st.integers(0, 2**31), ties=st.booleans())
def test_multiclass_is_one_vs_rest_max_over_classes(n, G, C, seed, ties):
    probs, y, g = _data(n + G * C, G, C, seed, ties)
    pred = probs.argmax(1)
    m = compute_metrics(probs, y, g, G, C)
    kw = dict(sensitive_features=g)
    dp = max(demographic_parity_difference((y == c) * 1, (pred == c) * 1, **kw) for c in range(C))
    eo = max(equalized_odds_difference((y == c) * 1, (pred == c) * 1, **kw) for c in range(C))
    eop = max(equal_opportunity_difference((y == c) * 1, (pred == c) * 1, **kw) for c in range(C))
    _close(m["demographic_parity_difference"], dp)
    _close(m["equalized_odds_difference"], eo)
    _close(m["equal_opportunity_difference"], eop)
    _close(m["balanced_accuracy"], balanced_accuracy_score(y, pred))
    _close(m["auc"], roc_auc_score(y, probs, multi_class="ovr", labels=list(range(C))))
    mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=g)
    for k in range(G):
        gi = g == k
        _close(m["group_accuracy"][k], mf.by_group[k])
        _close(m["group_auc"][k],
               roc_auc_score(y[gi], probs[gi], multi_class="ovr", labels=list(range(C))))
        _close(m["group_ece"][k], _ece_reference(probs[gi], y[gi]))


@given(seed=st.integers(0, 2**31), C=st.integers(2, 4),
       cuts=st.lists(st.integers(1, 60), max_size=5))
def test_streaming_equals_one_shot(seed, C, cuts):
    gen = torch.Generator().manual_seed(seed)
    n, G = 80, 3
    logits = torch.randn(n, C, generator=gen) * 3
    y = torch.randint(0, C, (n,), generator=gen)
    g = torch.randint(0, G, (n,), generator=gen)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    streamed, whole = GroupMetrics(G, C), GroupMetrics(G, C)
    for a, b in zip(bounds[:-1], bounds[1:]):
        streamed.update(logits[a:b], y[a:b], g[a:b])
    whole.update(logits, y, g)
    assert streamed.num_updates == len(bounds) - 1 and streamed.num_samples == n
    s, w = streamed.compute(ci=True, n_boot=30, seed=1), whole.compute(ci=True, n_boot=30, seed=1)
    assert s == w
    one_shot = compute_metrics(torch.softmax(logits, 1), y, g, G, C,
                               losses=F.cross_entropy(logits, y, reduction="none"))
    for key, value in one_shot.items():
        if isinstance(value, float):
            _close(s[key], value)
        elif key.startswith("group_") and key != "group_count":
            for a, b in zip(s[key], value):
                _close(a, b)
        else:
            assert s[key] == value, key


def test_binary_single_score_column_and_probs_inputs():
    gen = torch.Generator().manual_seed(0)
    z, y, g = torch.randn(50, generator=gen), torch.randint(0, 2, (50,)), torch.arange(50) % 3
    one, two, probs = GroupMetrics(3, 2), GroupMetrics(3, 2), GroupMetrics(3, 2, inputs="probs")
    one.update(z, y, g)
    two.update(torch.stack([torch.zeros(50), z], 1), y, g)
    probs.update(torch.sigmoid(z.double()).unsqueeze(1), y, g)
    a, b, c = one.compute(), two.compute(), probs.compute()
    for key in ("accuracy", "auc", "equalized_odds_difference", "loss_variance", "ece_gap"):
        _close(a[key], b[key])
        _close(a[key], c[key])


def test_missing_group_is_reported_not_a_crash():
    probs, y, g = _data(60, 2, 2, 3, False)
    g = g * 2  # groups 0 and 2 of 4 have samples
    m = compute_metrics(probs, y, g, 4, 2)
    ref = compute_metrics(probs, y, g // 2, 2, 2)
    assert m["missing_groups"] == [1, 3]
    assert m["group_count"][1] == m["group_count"][3] == 0
    for key in ("group_accuracy", "group_auc", "group_ece", "group_loss"):
        assert m[key][1] is None and m[key][3] is None
        assert [m[key][0], m[key][2]] == ref[key]
    for key in ci_keys():
        _close(m[key], ref[key])
    assert any("without samples" in note and "1, 3" in note for note in m["notes"])
    ci = bootstrap(probs, y, g, 4, 2, n_boot=20)["intervals"]
    assert ci["group_accuracy"][1] is None and ci["group_accuracy"][0] is not None


def test_single_class_group_has_null_auc_left_out_of_gap():
    probs, y, g = _data(90, 3, 2, 5, False)
    y[g == 1] = 0  # group 1: no positives, so no AUC and no TPR
    m = compute_metrics(probs, y, g, 3, 2)
    assert m["group_auc"][1] is None
    aucs = [roc_auc_score(y[g == k], probs[g == k, 1]) for k in (0, 2)]
    _close(m["auc_gap"], abs(aucs[0] - aucs[1]))
    _close(m["worst_group_auc"], min(aucs))
    keep = g != 1
    pred = probs.argmax(1)
    _close(m["equal_opportunity_difference"],
           equal_opportunity_difference(y[keep], pred[keep], sensitive_features=g[keep]))
    assert any("AUC undefined" in note and "groups 1" in note for note in m["notes"])
    assert any(note.startswith("TPR undefined") for note in m["notes"])


def test_loss_variance_is_population_variance_of_group_means():
    # group 0: p(label) = 0.5 -> CE ln 2; group 1: p(label) = 1 -> CE 0
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    m = compute_metrics(probs, [0, 1, 0, 1], [0, 0, 1, 1], 2, 2)
    _close(m["group_loss"][0], math.log(2))
    _close(m["loss_variance"], (math.log(2) / 2) ** 2)


def test_nan_score_names_batch_and_row():
    m = GroupMetrics(2, 3)
    m.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    bad = torch.randn(5, 3)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite score at batch 1, row 3, column 1: nan"):
        m.update(bad, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"row 2"):
        compute_metrics(np.array([[0.5, 0.5]] * 2 + [[np.inf, 0.0]]), [0, 1, 0], [0, 0, 0], 1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([0, 3])), r"labels out of range \[0, 3\) at batch 0, row 1: 3"),
    (dict(groups=torch.tensor([-1, 0])), r"groups out of range \[0, 2\) at batch 0, row 0"),
    (dict(labels=torch.tensor([0.0, 1.0])), r"labels must be integers"),
    (dict(scores=torch.randn(2, 4)), r"shape \[N, 3\]"),
    (dict(groups=torch.tensor([0])), r"groups must have shape \[2\]"),
])
def test_bad_batches_are_value_errors(kwargs, match):
    args = dict(scores=torch.randn(2, 3), labels=torch.tensor([0, 1]), groups=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GroupMetrics(2, 3).update(args["scores"], args["labels"], args["groups"])


def test_logits_given_as_probs_and_empty_accumulator_are_errors():
    m = GroupMetrics(1, 2, inputs="probs")
    with pytest.raises(ValueError, match=r"batch 0, row 0.*inputs='logits'"):
        m.update(torch.tensor([[2.0, -1.0]]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no samples"):
        m.compute()
    with pytest.raises(ValueError, match="inputs must be one of"):
        GroupMetrics(1, 2, inputs="scores")
    with pytest.raises(ValueError, match="num_classes"):
        GroupMetrics(1, 1)


def test_bootstrap_is_seeded_and_shrinks_with_more_data():
    probs, y, g = _data(200, 2, 2, 7, False)
    a = bootstrap(probs, y, g, 2, 2, n_boot=100, seed=3)
    assert a == bootstrap(probs, y, g, 2, 2, n_boot=100, seed=3)
    assert a != bootstrap(probs, y, g, 2, 2, n_boot=100, seed=4)
    assert all(lo <= hi for lo, hi in (a["intervals"][k] for k in ci_keys()))
    big = [np.tile(x, 16) if x.ndim == 1 else np.tile(x, (16, 1)) for x in (probs, y, g)]
    b = bootstrap(big[0], big[1], big[2], 2, 2, n_boot=100, seed=3)

    def width(ci, key):
        return ci["intervals"][key][1] - ci["intervals"][key][0]

    # 16x the samples: intervals ~4x narrower; ask for 2x so chance cannot flip it.
    for key in ("worst_group_accuracy", "accuracy_gap", "demographic_parity_difference"):
        assert width(b, key) < width(a, key) / 2, key


def test_bootstrap_degenerate_cases_are_exact():
    # a group of one row always resamples to itself; a perfect classifier has no gap to vary
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.3, 0.7]])
    y, g = np.array([0, 1, 0, 1, 1]), np.array([0, 0, 0, 0, 1])
    ci = bootstrap(probs, y, g, 2, 2, n_boot=50)["intervals"]
    assert ci["group_accuracy"][1] == [1.0, 1.0]
    assert ci["accuracy_gap"] == [0.0, 0.0] and ci["worst_group_accuracy"] == [1.0, 1.0]
    assert ci["worst_group_auc"] is not None  # group 1 has no AUC; group 0 carries it


def test_intersect_groups():
    sex, age = np.array([0, 1, 1, 0, 1]), np.array([2, 0, 1, 1, 2])
    ids, n = intersect_groups(sex, age)
    assert n == 6 and ids.tolist() == [2, 3, 4, 1, 5]
    names = intersect_group_names(["f", "m"], ["young", "mid", "old"])
    assert [names[i] for i in ids] == ["f/old", "m/young", "m/mid", "f/mid", "m/old"]
    t, n4 = intersect_groups(torch.tensor([0, 1]), torch.tensor([0, 0]), sizes=[2, 4])
    assert isinstance(t, torch.Tensor) and n4 == 8 and t.tolist() == [0, 4]
    with pytest.raises(ValueError, match=r"attribute 1 out of range \[0, 2\) at row 0: 3"):
        intersect_groups(torch.tensor([0]), torch.tensor([3]), sizes=[2, 2])


def _two_process_worker(path, logits, labels, groups):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader, TensorDataset

    # A forked child inherits any Accelerator singleton the parent made; start clean.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    loader = acc.prepare(DataLoader(TensorDataset(logits, labels, groups), batch_size=4))
    m = GroupMetrics(3, 3)
    local = 0
    for x, y, g in loader:
        local += len(y)
        m.update(x, y, g, accelerator=acc)
    out = m.compute()
    out["local_rows"] = local
    out["rows"] = m.num_samples
    if acc.is_main_process:
        with open(path, "w") as f:
            json.dump(out, f)
    acc.wait_for_everyone()
    # Destroy the gloo group before exit, as the trainer does: left to the interpreter's exit,
    # a rank can abort ('terminate called') while its peer closes the connection.
    acc.end_training()


def test_two_processes_merge_to_single_process_numbers(tmp_path):
    from accelerate.utils import patch_environment
    from accelerate.utils.launch import PrepareForLaunch
    from torch.multiprocessing import start_processes

    gen = torch.Generator().manual_seed(0)
    n = 37  # not a multiple of 2 processes x batch 4: the last batch is padded with duplicates
    logits, y = torch.randn(n, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    g = torch.randint(0, 3, (n,), generator=gen)
    path = tmp_path / "rank0.json"
    # accelerate's debug_launcher, but spawned: a forked child of a process that already ran
    # OpenMP deadlocks in libgomp. The file store needs no network port.
    with patch_environment(world_size=2, accelerate_debug_rdv_file=str(tmp_path / "rdv"),
                           accelerate_use_cpu="yes", accelerate_mixed_precision="no",
                           master_addr="127.0.0.1", gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(_two_process_worker, debug=True),
                        args=(str(path), logits, y, g), nprocs=2, start_method="spawn")
    merged = json.loads(path.read_text())
    single = GroupMetrics(3, 3)
    single.update(logits, y, g)
    ref = single.compute()
    assert merged["rows"] == n and merged["local_rows"] < n
    assert merged["group_count"] == ref["group_count"]
    for key in ci_keys() + ("accuracy", "auc", "balanced_accuracy"):
        _close(merged[key], ref[key])
    for key in ("group_accuracy", "group_auc", "group_ece", "group_loss"):
        for a, b in zip(merged[key], ref[key]):
            _close(a, b)


# ------------------------------------------------------------------------ the metric table

def test_empty_batch_is_a_no_op():
    m = GroupMetrics(2, 3)
    m.update(torch.empty(0, 3), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    m.update([], [], [])  # an empty list is shape [0]: would be a one-score-per-row batch
    assert m.num_updates == 0 and m.num_samples == 0
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\) at batch 0, row 0"):
        m.update(torch.zeros(1, 3), torch.tensor([5]), torch.tensor([0]))


def test_empty_batch_still_joins_the_gather():
    class Gather:  # another process contributes one row to every gather
        calls = []

        def gather_for_metrics(self, tensors):
            self.calls.append([tuple(t.shape) for t in tensors])
            other = (torch.full((1, 3), 1 / 3), torch.tensor([1]), torch.tensor([1]),
                     torch.tensor([math.log(3)]))
            return tuple(torch.cat([t.to(o.dtype), o]) for t, o in zip(tensors, other))

    m = GroupMetrics(2, 3)
    m.update(torch.empty(0, 3), [], [], accelerator=Gather())
    assert Gather.calls == [[(0, 3), (0,), (0,), (0,)]]
    assert m.num_samples == 1  # the other process's row arrived


def test_table_covers_every_scalar_of_compute_metrics():
    from fastfair.metrics import METRICS, scalar_keys

    rep = compute_metrics(*_data(64, 3, 2, seed=0, ties=False)[:3], 3, 2)
    scalars = {k for k, v in rep.items() if isinstance(v, float) or v is None}
    derived = {k for k, m in METRICS.items() if m.derive is not None}
    assert scalars == set(scalar_keys()) - derived
    assert set(ci_keys()) <= set(bootstrap(*_data(64, 3, 2, 0, False)[:3], 3, 2, n_boot=2)
                                 ["intervals"])
    workflow = {k for k, m in METRICS.items() if m.measured_by}
    assert workflow == {"counterfactual_flip", "asr", "flip_rate"}


def test_key_helpers_keep_the_orders_callers_print():
    from fastfair.metrics import objective_keys, summary_keys, table_keys

    # the trainer's side-by-side table and per-epoch log, row for row as before the table
    assert summary_keys() == ("accuracy", "balanced_accuracy", "worst_group_accuracy",
                              "accuracy_gap", "equalized_odds_difference",
                              "demographic_parity_difference", "auc", "loss_variance")
    assert table_keys("debias") == ("accuracy", "worst_group_accuracy", "accuracy_gap",
                                    "equalized_odds_difference", "counterfactual_flip")
    assert table_keys("bias-transfer") == ("accuracy", "worst_group_accuracy", "asr",
                                           "flip_rate")
    assert set(objective_keys()) == {"worst_group_accuracy", "worst_group_auc", "accuracy_gap",
                                     "auc_gap", "max_group_loss", "accuracy", "auc"}
    with pytest.raises(ValueError, match="no metric table 'sweep'; valid tables: bias-transfer, "
                                         "debias"):
        table_keys("sweep")


def test_higher_is_better_names_the_valid_metrics():
    from fastfair.metrics import axis_label, higher_is_better

    with pytest.raises(ValueError, match=r"unknown metric 'wga'; valid names: accuracy, "
                                         r"balanced_accuracy, .*max_group_loss"):
        higher_is_better("wga")
    assert axis_label("accuracy_gap") == "accuracy gap (max − min over groups) (lower is better)"


def test_scalar_metrics_derives_max_group_loss():
    from fastfair.metrics import scalar_metrics

    rep = compute_metrics(*_data(64, 3, 2, seed=1, ties=False)[:3], 3, 2)
    out = scalar_metrics(rep)
    assert out["max_group_loss"] == max(rep["group_loss"])
    assert scalar_metrics({"group_loss": [None, None]}, ["max_group_loss"]) == \
        {"max_group_loss": None}
    assert scalar_metrics({"accuracy": 0.5, "counterfactual_flip": 0.1},
                          ["accuracy", "counterfactual_flip", "auc"]) == \
        {"accuracy": 0.5, "counterfactual_flip": 0.1}


def test_directions_agree_with_fairlearn_and_sklearn():
    """A perfect, equally calibrated predictor beats one that fails group 1, on every metric,
    in the direction the table says; fairlearn's differences agree on which is fairer."""
    from fastfair.metrics import higher_is_better, scalar_keys, scalar_metrics

    y = np.tile([0, 1], 40)
    g = np.repeat([0, 1], 40)
    good = np.where(y[:, None] == np.arange(2), 0.97, 0.03)
    bad = good.copy()
    # group 1, confidently: every negative called positive, half the positives missed
    bad[(g == 1) & (y == 0)] = [0.03, 0.97]
    bad[np.flatnonzero((g == 1) & (y == 1))[::2]] = [0.97, 0.03]
    v_good = scalar_metrics(compute_metrics(good, y, g, 2, 2))
    v_bad = scalar_metrics(compute_metrics(bad, y, g, 2, 2))
    for key in scalar_keys():
        assert (v_good[key] > v_bad[key]) == higher_is_better(key), key
        assert v_good[key] != v_bad[key], key
    for fn, key in ((demographic_parity_difference, "demographic_parity_difference"),
                    (equalized_odds_difference, "equalized_odds_difference"),
                    (equal_opportunity_difference, "equal_opportunity_difference")):
        fair, unfair = (fn(y, p.argmax(1), sensitive_features=g) for p in (good, bad))
        assert (fair > unfair) == higher_is_better(key), key
    assert (accuracy_score(y, good.argmax(1)) > accuracy_score(y, bad.argmax(1))) \
        == higher_is_better("accuracy")


def test_docs_list_every_metric():
    from pathlib import Path

    from fastfair.metrics import METRICS

    docs = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert [k for k in METRICS if f"`{k}`" not in docs] == []
