"""Group fairness metrics on pooled predictions: every standard number from one call.

One fairness number lies (FairLoRA): a model tuned for one metric can look worse on another, so
:func:`compute_metrics` returns them all, computed on the pooled predictions of the whole split
(never averaged over mini-batches), and :func:`bootstrap` puts percentile intervals on the gaps
and worst-group values, which are noisy when groups are small.

Conventions (see docs/metrics.md):

* predictions are ``argmax`` of the probabilities; binary tasks use class 1 as the positive class;
* multiclass demographic parity, equal opportunity and equalized odds are one-vs-rest: each class
  ``c`` in turn is the positive class, and the reported value is the max over classes;
* AUC is the binary AUC of class 1, or the one-vs-rest macro AUC for multiclass, over classes
  with both positives and negatives; a group with a single class has no AUC (``None``);
* a gap is ``max - min`` over the groups where the value is defined; a group without samples is
  reported missing (``None``) and left out of every worst-group value and gap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

INPUTS = ("logits", "probs")

def _max_group_loss(m: dict) -> float | None:
    """The largest mean cross-entropy of any group with samples (GroupDRO's objective)."""
    return max((v for v in m.get("group_loss") or [] if v is not None), default=None)


@dataclass(frozen=True)
class Metric:
    """One scalar metric: its direction and where it is shown.

    ``summary``: the trainer's per-epoch log and side-by-side table; ``ci``: :func:`bootstrap`
    puts an interval on it (the values small groups make noisy); ``objective``: offered as a
    tune objective; ``tables``: the workflow result tables that show it. ``derive`` reads it
    from a :func:`compute_metrics` dict when it is not one of its keys; ``measured_by`` names
    the workflow that measures it when :func:`compute_metrics` cannot.
    """

    higher_is_better: bool
    label: str
    summary: bool = False
    ci: bool = False
    objective: bool = False
    tables: tuple[str, ...] = ()
    derive: Callable[[dict], float | None] | None = None
    measured_by: str | None = None


# The one table of scalar metrics. Its order is the order of every table and log that shows
# them (the summary keys first, in the order the trainer's side-by-side table has always had).
METRICS: dict[str, Metric] = {
    "accuracy": Metric(True, "accuracy", summary=True, objective=True,
                       tables=("debias", "bias-transfer")),
    "balanced_accuracy": Metric(True, "balanced accuracy", summary=True),
    "worst_group_accuracy": Metric(True, "worst-group accuracy", summary=True, ci=True,
                                   objective=True, tables=("debias", "bias-transfer")),
    "accuracy_gap": Metric(False, "accuracy gap (max − min over groups)", summary=True, ci=True,
                           objective=True, tables=("debias",)),
    "equalized_odds_difference": Metric(False, "equalized odds difference", summary=True,
                                        ci=True, tables=("debias",)),
    "demographic_parity_difference": Metric(False, "demographic parity difference",
                                            summary=True, ci=True),
    "auc": Metric(True, "AUC", summary=True, objective=True),
    "loss_variance": Metric(False, "variance of the group losses", summary=True, ci=True),
    "worst_group_auc": Metric(True, "worst-group AUC", ci=True, objective=True),
    "auc_gap": Metric(False, "AUC gap (max − min over groups)", ci=True, objective=True),
    "equal_opportunity_difference": Metric(False, "equal opportunity difference", ci=True),
    "ece_gap": Metric(False, "calibration (ECE) gap", ci=True),
    "max_group_loss": Metric(False, "largest group loss", objective=True,
                             derive=_max_group_loss),
    "counterfactual_flip": Metric(False, "counterfactual flip rate", tables=("debias",),
                                  measured_by="debias"),
    "asr": Metric(False, "attack success rate", tables=("bias-transfer",),
                  measured_by="bias-transfer"),
    "flip_rate": Metric(False, "flip rate to the trigger's class", tables=("bias-transfer",),
                        measured_by="bias-transfer"),
}


def metric(name: str) -> Metric:
    """The :data:`METRICS` entry of ``name``; ``ValueError`` naming the valid names."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(METRICS)}")
    return METRICS[name]


def higher_is_better(name: str) -> bool:
    """Direction of a metric, for Pareto fronts, objectives and "best" readings."""
    return metric(name).higher_is_better


def axis_label(name: str) -> str:
    """``"worst-group accuracy (higher is better)"``: a plot axis or title for the metric."""
    m = metric(name)
    return f"{m.label} ({'higher' if m.higher_is_better else 'lower'} is better)"


def summary_keys() -> tuple[str, ...]:
    """What the trainer's per-epoch log and side-by-side summary show."""
    return tuple(k for k, m in METRICS.items() if m.summary)


def ci_keys() -> tuple[str, ...]:
    """What :func:`bootstrap` puts intervals on."""
    return tuple(k for k, m in METRICS.items() if m.ci)


def objective_keys() -> tuple[str, ...]:
    """The suggested tune objectives (any metric of :func:`scalar_keys` is accepted)."""
    return tuple(k for k, m in METRICS.items() if m.objective)


def table_keys(table: str) -> tuple[str, ...]:
    """The columns of a workflow's result table (``"debias"``, ``"bias-transfer"``)."""
    keys = tuple(k for k, m in METRICS.items() if table in m.tables)
    if not keys:
        known = sorted({t for m in METRICS.values() for t in m.tables})
        raise ValueError(f"no metric table {table!r}; valid tables: {', '.join(known)}")
    return keys


def scalar_keys() -> tuple[str, ...]:
    """Every metric read from a :func:`compute_metrics` dict (its scalars and the derived ones)."""
    return tuple(k for k, m in METRICS.items() if m.measured_by is None)


def scalar_metrics(m: dict, keys=None) -> dict:
    """``{name: value}`` of a metrics dict, in table order; derived metrics are computed.

    ``keys`` (default :func:`scalar_keys`) must be table names; a key a workflow measures is
    taken from ``m`` when present, and a key ``m`` lacks is left out.
    """
    out = {}
    for k in scalar_keys() if keys is None else keys:
        entry = metric(k)
        if entry.derive is not None:
            out[k] = entry.derive(m)
        elif k in m:
            out[k] = m[k]
    return out


# Deprecated alias of higher_is_better() for callers not yet moved to the table.
HIGHER_IS_BETTER = {k: m.higher_is_better for k, m in METRICS.items()}

# Probabilities are clipped here before the log, like scikit-learn's log_loss on float32 input.
_PROB_EPS = float(np.finfo(np.float32).eps)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_sizes(num_groups: int, num_classes: int, n_bins: int = 15) -> None:
    _check_int("num_groups", num_groups, 1)
    _check_int("num_classes", num_classes, 2)
    _check_int("n_bins", n_bins, 1)


def _where(batch: int | None, row: int) -> str:
    return f"row {row}" if batch is None else f"batch {batch}, row {row}"


def _check_index(name: str, values: torch.Tensor, size: int, batch: int | None) -> None:
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
    bad = (values < 0) | (values >= size)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} out of range [0, {size}) at {_where(batch, row)}: {int(values[row])}"
        )


def _check_finite(name: str, x: torch.Tensor, batch: int | None) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        col = f", column {first[1]}" if len(first) > 1 else ""
        raise ValueError(
            f"non-finite {name} at {_where(batch, first[0])}{col}: {x[tuple(first)].item()}")


def to_probs_and_losses(
    scores, labels, num_classes: int, inputs: str = "logits", batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one batch and return ``(probs [N, C] float32, labels int64, CE loss [N] float32)``.

    ``scores`` is ``[N, C]``; a binary task (``num_classes == 2``) may also give one score per
    row (``[N]`` or ``[N, 1]``), the logit or probability of class 1. The loss is exact
    ``log_softmax`` for logits; probabilities are clipped at float32 eps before the log.
    Errors name the offending row (and ``batch`` when given).
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, device=scores.device)
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    single = scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1)
    if single and num_classes != 2:
        raise ValueError(
            f"one score per row is only allowed for binary tasks, got num_classes={num_classes}"
        )
    if not single and (scores.dim() != 2 or scores.shape[1] != num_classes):
        raise ValueError(
            f"scores must have shape [N, {num_classes}] (num_classes), got {tuple(scores.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must have shape [{scores.shape[0]}], got {tuple(labels.shape)}"
        )
    _check_finite("score", scores, batch)
    _check_index("labels", labels, num_classes, batch)
    # float32 at least: half-precision log-probs would put ties and -inf into AUC and loss.
    x = (scores.reshape(-1, 1) if single else scores).to(
        torch.float64 if scores.dtype == torch.float64 else torch.float32)
    if inputs == "logits":
        if single:
            logp = torch.cat([F.logsigmoid(-x), F.logsigmoid(x)], dim=1)
        else:
            logp = F.log_softmax(x, dim=1)
        probs = logp.exp()
    else:
        probs = torch.cat([1 - x, x], dim=1) if single else x
        bad = ((probs < 0) | (probs > 1)).any(1) | ((probs.sum(1) - 1).abs() > 1e-2)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"probabilities must lie in [0, 1] and sum to 1 (inputs='probs'), at "
                f"{_where(batch, row)}: {x[row, :8].tolist()}; pass inputs='logits' for logits"
            )
        logp = probs.clamp_min(_PROB_EPS).log()
    losses = -logp.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return probs.float(), labels.long(), losses.float()


def _auc_per_class(probs: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """One-vs-rest AUC of each class in ``classes``; NaN where it lacks positives or negatives.

    Mann-Whitney form with average ranks for ties, which equals the trapezoidal ROC area that
    scikit-learn's roc_auc_score computes, at a cost the bootstrap can afford.
    """
    n = labels.shape[0]
    out = np.full(len(classes), np.nan)
    if n < 2:
        return out
    ranks = rankdata(probs[:, list(classes)], axis=0)
    for j, c in enumerate(classes):
        pos = labels == c
        n_pos = int(pos.sum())
        n_neg = n - n_pos
        if n_pos and n_neg:
            out[j] = (ranks[pos, j].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def _auc(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, int]:
    """``(auc, number of classes left out)``: class-1 AUC if binary, else OvR macro."""
    if num_classes == 2:
        return float(_auc_per_class(probs, labels, [1])[0]), 0
    per = _auc_per_class(probs, labels, range(num_classes))
    ok = ~np.isnan(per)
    return (float(per[ok].mean()) if ok.any() else float("nan")), int((~ok).sum())


def _spread(values: np.ndarray) -> float:
    """``max - min`` over the defined (non-NaN) entries; NaN if none."""
    ok = values[~np.isnan(values)]
    return float(ok.max() - ok.min()) if ok.size else float("nan")


def _raw(probs, labels, groups, losses, G: int, C: int, n_bins: int, overall_auc: bool) -> dict:
    """Per-group counts, confusion matrices, AUC, ECE and mean loss, as float64 arrays."""
    n = np.bincount(groups, minlength=G).astype(np.float64)
    present = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_n = np.where(present, 1.0 / n, np.nan)
    pred = probs.argmax(1)
    conf = np.bincount((groups * C + labels) * C + pred, minlength=G * C * C).reshape(G, C, C)
    top = probs[np.arange(labels.shape[0]), pred].astype(np.float64)
    # Top-label ECE, equal-width bins: Σ_b (n_b/n)|acc_b - conf_b| = Σ_b |Σcorrect - Σconf| / n,
    # so one weighted bincount per group and bin does it.
    key = groups * n_bins + np.clip((top * n_bins).astype(np.int64), 0, n_bins - 1)
    gap = np.bincount(key, weights=(pred == labels) - top, minlength=G * n_bins)
    ece = np.abs(gap.reshape(G, n_bins)).sum(1) * inv_n
    loss = np.bincount(groups, weights=losses.astype(np.float64), minlength=G) * inv_n
    order = np.argsort(groups, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(n.astype(np.int64))])
    auc = np.full(G, np.nan)
    auc_skipped = np.zeros(G, dtype=np.int64)
    for g in np.flatnonzero(present):
        idx = order[bounds[g]:bounds[g + 1]]
        auc[g], auc_skipped[g] = _auc(probs[idx], labels[idx], C)
    out = dict(n=n, present=present, inv_n=inv_n, conf=conf, ece=ece, loss=loss, auc=auc,
               auc_skipped=auc_skipped)
    if overall_auc:
        out["overall_auc"], out["overall_auc_skipped"] = _auc(probs, labels, C)
    return out


def _rates(raw: dict, C: int) -> dict:
    """Per-group, per-class selection rate, TPR and FPR ``[G, K]`` over the positive classes."""
    conf = raw["conf"].astype(np.float64)
    classes = [1] if C == 2 else list(range(C))
    tp = conf[:, classes, classes]
    pos = conf.sum(2)[:, classes]
    sel = conf.sum(1)[:, classes]
    neg = raw["n"][:, None] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(pos > 0, tp / pos, np.nan)
        fpr = np.where(neg > 0, (sel - tp) / neg, np.nan)
        sr = sel * raw["inv_n"][:, None]
    return dict(classes=classes, tpr=tpr, fpr=fpr, sr=sr)


def _max_over_classes(per_class: Sequence[float]) -> float:
    vals = [v for v in per_class if not np.isnan(v)]
    return max(vals) if vals else float("nan")


def _summary(raw: dict, C: int) -> dict:
    """Scalars (float, NaN when undefined) and per-group arrays from :func:`_raw`."""
    conf = raw["conf"]
    group_acc = np.trace(conf, axis1=1, axis2=2) * raw["inv_n"]
    r = _rates(raw, C)
    k = len(r["classes"])
    tpr_d = [_spread(r["tpr"][:, j]) for j in range(k)]
    fpr_d = [_spread(r["fpr"][:, j]) for j in range(k)]
    eodds = [_max_over_classes(pair) for pair in zip(tpr_d, fpr_d)]
    loss = raw["loss"][raw["present"]]
    ga, gauc = group_acc[~np.isnan(group_acc)], raw["auc"][~np.isnan(raw["auc"])]
    return dict(
        group_accuracy=group_acc,
        worst_group_accuracy=float(ga.min()) if ga.size else float("nan"),
        accuracy_gap=_spread(group_acc),
        worst_group_auc=float(gauc.min()) if gauc.size else float("nan"),
        auc_gap=_spread(raw["auc"]),
        equalized_odds_difference=_max_over_classes(eodds),
        equal_opportunity_difference=_max_over_classes(tpr_d),
        demographic_parity_difference=_max_over_classes(
            [_spread(r["sr"][:, j]) for j in range(k)]),
        ece_gap=_spread(raw["ece"]),
        loss_variance=float(loss.var()) if loss.size else float("nan"),
        rates=r,
    )


def _as_numpy(probs, labels, groups, losses, G: int, C: int):
    probs_t = torch.as_tensor(probs)
    if probs_t.dim() != 2 or probs_t.shape[1] != C:
        raise ValueError(
            f"probs must have shape [N, {C}] (num_classes), got {tuple(probs_t.shape)}")
    n = probs_t.shape[0]
    if n == 0:
        raise ValueError("no samples: probs is empty")
    labels_t, groups_t = torch.as_tensor(labels), torch.as_tensor(groups)
    for name, t in (("labels", labels_t), ("groups", groups_t)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    _check_finite("probability", probs_t, None)
    _check_index("labels", labels_t, C, None)
    _check_index("groups", groups_t, G, None)
    if losses is None:
        rows = torch.arange(n)
        losses_t = -probs_t.double()[rows, labels_t.long()].clamp_min(_PROB_EPS).log()
    else:
        losses_t = torch.as_tensor(losses)
        if losses_t.shape != (n,):
            raise ValueError(f"losses must have shape [{n}], got {tuple(losses_t.shape)}")
        _check_finite("loss", losses_t, None)

    def np_(t, dtype):
        return t.detach().cpu().numpy().astype(dtype, copy=False)

    return (np_(probs_t, np.float64), np_(labels_t, np.int64), np_(groups_t, np.int64),
            np_(losses_t, np.float64))


def _none(x) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def _fmt_groups(ids) -> str:
    return ", ".join(str(int(g)) for g in ids)


def _notes(raw: dict, r: dict, missing: np.ndarray, C: int) -> list[str]:
    """Every value left out or undefined in :func:`compute_metrics`, and why."""
    notes = []
    present = raw["present"]
    if missing.size:
        notes.append(f"groups without samples (null, left out of worst-group values and gaps): "
                     f"{_fmt_groups(missing)}")
    no_auc = np.flatnonzero(present & np.isnan(raw["auc"]))
    if no_auc.size:
        notes.append(f"AUC undefined (a single class) in groups {_fmt_groups(no_auc)}: null, "
                     f"left out of worst_group_auc and auc_gap")
    part = np.flatnonzero(present & ~np.isnan(raw["auc"]) & (raw["auc_skipped"] > 0))
    if part.size:
        notes.append(f"groups {_fmt_groups(part)}: AUC is the macro over only the classes with "
                     f"both positives and negatives there")
    if np.isnan(raw["overall_auc"]):
        notes.append("overall AUC undefined: the labels hold a single class")
    elif raw["overall_auc_skipped"]:
        notes.append(f"overall AUC leaves out {raw['overall_auc_skipped']} classes without "
                     f"both positives and negatives")
    for name, rate in (("TPR", r["tpr"]), ("FPR", r["fpr"])):
        undefined = [(int(gi), r["classes"][j]) for gi, j in zip(*np.nonzero(np.isnan(rate)))
                     if present[gi]]
        if undefined:
            what = ", ".join(f"group {gi}" + (f" class {c}" if C > 2 else "")
                             for gi, c in undefined[:10])
            if len(undefined) > 10:
                what += f" and {len(undefined) - 10} more"
            notes.append(f"{name} undefined (no {'positives' if name == 'TPR' else 'negatives'}) "
                         f"for {what}: left out of the equal opportunity / equalized odds gaps")
    return notes


def compute_metrics(
    probs, labels, groups, num_groups: int, num_classes: int, losses=None, n_bins: int = 15
) -> dict:
    """Every group metric of pooled predictions, as a JSON-ready dict.

    ``probs`` ``[N, C]`` probabilities, ``labels`` and ``groups`` ``[N]`` integers, ``losses``
    ``[N]`` per-sample cross-entropy (default ``-log p[label]``). Keys: ``accuracy``,
    ``balanced_accuracy`` (mean recall over the classes present), ``group_accuracy`` and
    ``group_count`` (one entry per group), ``worst_group_accuracy``, ``accuracy_gap``, ``auc``,
    ``group_auc``, ``worst_group_auc``, ``auc_gap``, ``equalized_odds_difference`` (max of the
    TPR and FPR gaps), ``equal_opportunity_difference`` (TPR gap),
    ``demographic_parity_difference`` (selection-rate gap), ``group_ece`` (top-label ECE with
    ``n_bins`` equal-width bins), ``ece_gap``, ``group_loss`` (mean CE),
    ``loss_variance`` (population variance of ``group_loss`` over present groups: FairLoRA's
    penalty), ``missing_groups`` and ``notes``.

    Binary tasks use class 1 as positive. Multiclass parity and odds are one-vs-rest: the gap of
    each class as the positive class, max over classes. A rate undefined in a group (TPR without
    positives, AUC with one class) is ``None`` there and left out of its gap, with a note.
    Undefined scalars are ``None``.
    """
    _check_sizes(num_groups, num_classes, n_bins)
    G, C = int(num_groups), int(num_classes)
    p, y, g, loss = _as_numpy(probs, labels, groups, losses, G, C)
    raw = _raw(p, y, g, loss, G, C, n_bins, overall_auc=True)
    s = _summary(raw, C)
    present = raw["present"]
    total = raw["conf"].sum(0)
    class_n = total.sum(1)
    recall = np.diag(total)[class_n > 0] / class_n[class_n > 0]

    missing = np.flatnonzero(~present)
    notes = _notes(raw, s["rates"], missing, C)

    return {
        "accuracy": float(np.trace(total) / total.sum()),
        "balanced_accuracy": float(recall.mean()),
        "group_accuracy": [_none(v) for v in s["group_accuracy"]],
        "group_count": [int(v) for v in raw["n"]],
        "worst_group_accuracy": _none(s["worst_group_accuracy"]),
        "accuracy_gap": _none(s["accuracy_gap"]),
        "auc": _none(raw["overall_auc"]),
        "group_auc": [_none(v) for v in raw["auc"]],
        "worst_group_auc": _none(s["worst_group_auc"]),
        "auc_gap": _none(s["auc_gap"]),
        "equalized_odds_difference": _none(s["equalized_odds_difference"]),
        "equal_opportunity_difference": _none(s["equal_opportunity_difference"]),
        "demographic_parity_difference": _none(s["demographic_parity_difference"]),
        "group_ece": [_none(v) for v in raw["ece"]],
        "ece_gap": _none(s["ece_gap"]),
        "group_loss": [_none(v) for v in raw["loss"]],
        "loss_variance": _none(s["loss_variance"]),
        "missing_groups": [int(v) for v in missing],
        "notes": notes,
    }


def bootstrap(
    probs, labels, groups, num_groups: int, num_classes: int, losses=None, n_boot: int = 1000,
    seed: int = 0, level: float = 0.95, n_bins: int = 15,
) -> dict:
    """Seeded percentile bootstrap intervals for the gaps and worst-group values.

    Resamples rows with replacement within each group (group sizes fixed, as they are a design
    choice of the split, not noise), recomputes every value of :func:`ci_keys` and each group's
    accuracy, and returns ``{"level", "n_boot", "seed", "method", "intervals"}`` where
    ``intervals[key]`` is ``[low, high]`` (``None`` if undefined in every resample) and
    ``intervals["group_accuracy"]`` one such pair per group.
    """
    _check_sizes(num_groups, num_classes, n_bins)
    _check_int("n_boot", n_boot, 2)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    G, C = int(num_groups), int(num_classes)
    p, y, g, loss = _as_numpy(probs, labels, groups, losses, G, C)
    members = [np.flatnonzero(g == k) for k in range(G)]
    members = [m for m in members if m.size]
    rng = np.random.default_rng(seed)
    keys = ci_keys()
    values = np.full((n_boot, len(keys)), np.nan)
    group_acc = np.full((n_boot, G), np.nan)
    for b in range(n_boot):
        idx = np.concatenate([m[rng.integers(0, m.size, m.size)] for m in members])
        s = _summary(_raw(p[idx], y[idx], g[idx], loss[idx], G, C, n_bins, False), C)
        values[b] = [s[k] for k in keys]
        group_acc[b] = s["group_accuracy"]
    q = [50 * (1 - level), 50 * (1 + level)]

    def interval(col: np.ndarray):
        col = col[~np.isnan(col)]
        return [float(v) for v in np.percentile(col, q)] if col.size else None

    intervals = {k: interval(values[:, j]) for j, k in enumerate(keys)}
    intervals["group_accuracy"] = [interval(group_acc[:, k]) for k in range(G)]
    return {"level": level, "n_boot": int(n_boot), "seed": int(seed),
            "method": "percentile, rows resampled within each group", "intervals": intervals}


def intersect_groups(*attributes, sizes: Sequence[int] | None = None):
    """Intersectional group ids from several integer attributes: ``(group_ids, num_groups)``.

    ``group = ((a0 * n1) + a1) * n2 + a2 ...`` with ``n_i = sizes[i]``, so ``a0`` varies slowest
    (the order of :func:`intersect_group_names`). Give ``sizes`` when ids are built batch by
    batch; without it each size is ``max + 1`` of its attribute, which is only stable for a
    whole split at once. Tensors in give a tensor out, arrays an array.
    """
    if not attributes:
        raise ValueError("intersect_groups needs at least one attribute")
    if sizes is not None and len(sizes) != len(attributes):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(attributes)} attributes")
    ids, total, shape = None, 1, None
    for i, a in enumerate(attributes):
        t = torch.as_tensor(a)
        if t.dim() != 1 or (shape is not None and t.shape != shape):
            raise ValueError(f"attribute {i} must be 1-D of length {shape or 'N'}, "
                             f"got shape {tuple(t.shape)}")
        shape = t.shape
        if t.dtype.is_floating_point:
            raise ValueError(f"attribute {i} must be integers, got dtype {t.dtype}")
        t = t.long()
        n = int(sizes[i]) if sizes is not None else (int(t.max()) + 1 if t.numel() else 1)
        if n < 1:
            raise ValueError(f"sizes[{i}] must be >= 1, got {n}")
        _check_index(f"attribute {i}", t, n, None)
        ids = t if ids is None else ids * n + t
        total *= n
    if isinstance(attributes[0], torch.Tensor):
        return ids.to(attributes[0].device), total
    return ids.numpy(), total


def intersect_group_names(*names: Sequence[str], sep: str = "/") -> list[str]:
    """Names of :func:`intersect_groups` ids in id order: ``["f/young", "f/old", "m/young"]``."""
    out = [""]
    for i, level in enumerate(names):
        out = [f"{a}{sep}{b}" if i else str(b) for a in out for b in level]
    return out


class GroupMetrics:
    """Streaming accumulator of predictions for :func:`compute_metrics`.

    ``update`` takes a batch on any device (``inputs="logits"`` or ``"probs"``), validates it,
    and keeps probabilities, labels, groups and per-sample CE on the CPU (float32/int64), so
    every metric is exact on the pooled split. With ``accelerator=`` each batch is gathered
    across processes by ``gather_for_metrics``, which drops the duplicates that pad the last
    batch of a prepared dataloader; every process then holds the whole split.
    """

    def __init__(self, num_groups: int, num_classes: int, inputs: str = "logits",
                 n_bins: int = 15):
        _check_sizes(num_groups, num_classes, n_bins)
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        self.num_groups, self.num_classes = int(num_groups), int(num_classes)
        self.inputs, self.n_bins = inputs, int(n_bins)
        self.reset()

    def reset(self) -> None:
        self._parts: list[tuple[np.ndarray, ...]] = []
        self.num_updates = 0

    @property
    def num_samples(self) -> int:
        return sum(p[1].shape[0] for p in self._parts)

    @torch.no_grad()
    def update(self, scores, labels, groups, accelerator=None) -> None:
        """Add a batch: ``scores`` ``[N, C]`` (``[N]`` allowed if binary), ``labels``, ``groups``.

        Errors name the batch (the count of earlier ``update`` calls) and the row. An empty
        batch is a no-op (not counted either); with ``accelerator=`` it still joins the gather
        that every process enters.
        """
        scores = torch.as_tensor(scores)
        if scores.dim() > 0 and scores.shape[0] == 0:
            if accelerator is None:
                return
            # every process must enter the gather: an empty batch shaped to concatenate
            scores = torch.zeros(0, self.num_classes, device=scores.device)
            labels = groups = torch.zeros(0, dtype=torch.long, device=scores.device)
        batch = self.num_updates
        self.num_updates += 1
        groups = torch.as_tensor(groups, device=scores.device)
        if groups.dim() != 1 or groups.shape[0] != scores.shape[0]:
            raise ValueError(f"groups must have shape [{scores.shape[0]}] at batch {batch}, "
                             f"got {tuple(groups.shape)}")
        _check_index("groups", groups, self.num_groups, batch)
        probs, labels, losses = to_probs_and_losses(
            scores, labels, self.num_classes, self.inputs, batch)
        groups = groups.long()
        if accelerator is not None:
            probs, labels, groups, losses = accelerator.gather_for_metrics(
                (probs.contiguous(), labels, groups, losses))
        self._parts.append(tuple(t.cpu().numpy() for t in (probs, labels, groups, losses)))

    def arrays(self) -> dict[str, np.ndarray]:
        """The pooled ``probs``, ``labels``, ``groups``, ``losses``."""
        if not self._parts:
            raise ValueError("GroupMetrics has no samples: call update() before compute()")
        keys = ("probs", "labels", "groups", "losses")
        return {k: np.concatenate([p[i] for p in self._parts]) for i, k in enumerate(keys)}

    def compute(self, ci: bool = False, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
        """:func:`compute_metrics` of the pooled predictions; with ``ci``, adds ``"ci"`` from
        :func:`bootstrap`."""
        a = self.arrays()
        args = (a["probs"], a["labels"], a["groups"], self.num_groups, self.num_classes)
        out = compute_metrics(*args, losses=a["losses"], n_bins=self.n_bins)
        if ci:
            out["ci"] = bootstrap(*args, losses=a["losses"], n_boot=n_boot, seed=seed,
                                  level=level, n_bins=self.n_bins)
        return out

    def save(self, path) -> None:
        """Write the pooled predictions as the ``predictions_<split>.npz`` that
        ``fastfair report`` reads (call on the main process after gathering)."""
        a = self.arrays()
        np.savez_compressed(path, **a, num_groups=np.int64(self.num_groups),
                            num_classes=np.int64(self.num_classes))
