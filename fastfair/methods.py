"""Fairness methods as config: ``run(cfg)`` trains ``cfg`` by ``METHODS[cfg.method]``.

One entry per method a fairness researcher compares against, each with its paper, the config
keys it reads and where it needs group labels (documented at length in ``docs/methods.md``):

* ``erm``: plain fine-tuning, the mean cross-entropy.
* ``fairlora``: ``CE + lam · penalty(group mean losses)``, any ``FairnessLoss`` penalty.
* ``groupdro``: GroupDRO's ``Σ q_g L_g`` with online weights ``q_g ← q_g·exp(η L_g)``.
* ``reweight``: ERM on group-balanced batches (sampling with replacement).
* ``jtt``: ERM for ``jtt_epochs``, then a new run from the same initialization on the training
  set with the first run's errors repeated ``jtt_upweight`` times.
* ``dfr``: ERM, then the last layer alone refit on group-balanced subsets of one half of the
  validation split (L1 logistic regression on standardized features), the other half
  choosing the penalty, the fits averaged.

``run(cfg, resume=None, stop_after_steps=None, datasets=None, backbone=None, on_epoch_end=None)``
takes and returns what ``fastfair.trainer.train`` does (``{"output_dir", "val", "test"}``).
A method key set for a method that does not read it (``lam`` with ``erm``) is a ``ValueError``
before anything is built or trained.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# The config keys that belong to one method or another; a key a method does not read must keep
# its default, so a flag the chosen method would silently ignore is an error instead.
METHOD_KEYS = ("lam", "penalty", "penalty_alpha", "dro_step_size", "loss_groups", "balanced_sampling",
               "jtt_epochs", "jtt_upweight", "dfr_c_grid", "dfr_subsets")


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    needs: str  # where group labels are needed
    hyperparameters: tuple[str, ...]  # method keys it reads (the others must keep their defaults)
    runner: Callable  # (cfg, train_kwargs) -> result dict
    summary: str
    sets: dict = dataclasses.field(default_factory=dict)  # config values the method itself sets

    def run(self, cfg, **train_kwargs) -> dict:
        check(cfg, self)
        return self.runner(cfg, train_kwargs)


def _train(cfg, **kw) -> dict:
    from . import trainer  # looked up at call time, so a test can watch the runs

    return trainer.train(cfg, **kw)


def _defaults(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def derive(cfg, **changes):
    """A validated copy of ``cfg`` with ``changes``; keys the config lacks are left out."""
    have = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in have}).validate()


def _reset(cfg, keep=(), **changes):
    """``cfg`` with every method key but ``keep`` back at its default, plus ``changes``: the inner
    run of a two-stage method is plain ERM."""
    defaults = _defaults(cfg)
    reset = {k: defaults[k] for k in METHOD_KEYS if k in defaults and k not in keep}
    return derive(cfg, **{**reset, **changes})


def check(cfg, method: Method) -> None:
    """``ValueError`` naming a method key set for a method that does not read it."""
    defaults = _defaults(cfg)
    for key in METHOD_KEYS:
        if key in method.hyperparameters or key not in defaults:
            continue
        if getattr(cfg, key) not in (defaults[key], method.sets.get(key, defaults[key])):
            # (a value the method sets itself is fine: its saved config.yaml must load again)
            reads = ", ".join(method.hyperparameters) or "no method key"
            raise ValueError(f"{key}={getattr(cfg, key)!r} does not apply to method={method.name!r} "
                             f"(it reads {reads}); leave {key} at its default {defaults[key]!r}"
                             f"{_HINTS.get((method.name, key), '')}")
    if method.name == "jtt":
        up = float(cfg.jtt_upweight)
        if not (up >= 1 and up == int(up)):
            raise ValueError(f"jtt_upweight must be a whole number >= 1 (each error is repeated that "
                             f"many times), got {cfg.jtt_upweight!r}")
        if isinstance(cfg.jtt_epochs, bool) or not isinstance(cfg.jtt_epochs, int) or cfg.jtt_epochs < 1:
            raise ValueError(f"jtt_epochs must be an integer >= 1, got {cfg.jtt_epochs!r}")


_HINTS = {
    ("erm", "lam"): "; for CE + lam·penalty use method=fairlora",
    ("erm", "balanced_sampling"): "; for group-balanced batches use method=reweight",
    ("groupdro", "lam"): "; groupdro minimizes Σ q_g L_g alone, for CE + lam·Σ q_g L_g use "
                         "method=fairlora penalty=worst",
    ("groupdro", "penalty"): "; groupdro sets its own objective (penalty 'dro' at lam 1)",
}


def run(cfg, **train_kwargs) -> dict:
    """Train ``cfg`` by its ``method``; same arguments and result as ``fastfair.trainer.train``."""
    name = getattr(cfg, "method", "fairlora")
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name].run(cfg, **train_kwargs)


# -- one-run methods: a config change on the trainer -------------------------------------------


def _one_run(cfg, kw):
    return _train(derive(cfg, **METHODS[cfg.method].sets), **kw)


# -- two-stage methods ---------------------------------------------------------------------------


def _staged_inputs(cfg, kw, name):
    """Datasets and an initial model for a two-stage method; the model is built as the trainer
    would (seeded), so stage two can start again from a copy of it."""
    from accelerate.utils import set_seed

    from .models import create_backbone
    from .trainer import build_datasets_for

    for key in ("resume", "stop_after_steps"):
        if kw.get(key) is not None:
            raise ValueError(f"{key} is not supported by method={name!r}: it trains twice; run it again")
    datasets = kw.get("datasets") or build_datasets_for(cfg)
    model = kw.get("backbone")
    if model is None:
        set_seed(cfg.seed)
        model = create_backbone(cfg, num_classes=datasets["train"].num_classes)
    return datasets, model


@torch.no_grad()
def predict_dataset(model, ds, batch_size: int = 256, features: bool = False):
    """Arg-max predictions on every item of ``ds`` in order (eval mode, mode restored); with
    ``features`` also the classifier's input per item (captured by a hook, so any timm model)."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    feats, preds = [], []
    hook = None
    if features:
        hook = model.get_classifier().register_forward_pre_hook(lambda m, args: feats.append(args[0].float().cpu()))
    was = model.training
    model.eval()
    try:
        for images, _, _ in DataLoader(ds, batch_size=batch_size):
            preds.append(model(images.to(device)).argmax(-1).cpu())
    finally:
        model.train(was)
        if hook is not None:
            hook.remove()
    pred = torch.cat(preds)
    return (pred, torch.cat(feats)) if features else pred


def jtt_error_set(model, ds, batch_size: int = 256) -> torch.Tensor:
    """Indices of the items of ``ds`` that ``model`` misclassifies: JTT's error set."""
    pred = predict_dataset(model, ds, batch_size)
    return (pred != torch.as_tensor(ds.labels)).nonzero().flatten()


def upsample(ds, errors: torch.Tensor, times: int):
    """``ds`` with each item of ``errors`` present ``times`` times (the others once)."""
    from .workflows.common import Subset

    extra = errors.repeat(times - 1) if times > 1 else errors[:0]
    return Subset(ds, torch.cat([torch.arange(len(ds)), extra]))


def _run_jtt(cfg, kw):
    datasets, model = _staged_inputs(cfg, kw, "jtt")
    init = copy.deepcopy(model)  # stage two restarts from this exact initialization
    out = Path(cfg.output_dir)
    first = _reset(cfg, method="erm", epochs=cfg.jtt_epochs, output_dir=str(out / "identify"),
                   select_by=None)
    _train(first, datasets=datasets, backbone=model)
    errors = jtt_error_set(model, datasets["train"], cfg.eval_batch_size)
    up = int(cfg.jtt_upweight)
    out.mkdir(parents=True, exist_ok=True)
    (out / "jtt_errors.json").write_text(json.dumps(
        {"n_train": len(datasets["train"]), "upweight": up, "errors": errors.tolist()}) + "\n")
    res = _train(cfg, datasets={**datasets, "train": upsample(datasets["train"], errors, up)},
                 backbone=init, on_epoch_end=kw.get("on_epoch_end"))
    res["jtt"] = {"errors": errors.tolist(), "n_train": len(datasets["train"]), "upweight": up}
    return res


# -- DFR -----------------------------------------------------------------------------------------


def _halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the rows, split within each group, so both halves hold every group."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        a.append(idx[: (len(idx) + 1) // 2])
        b.append(idx[(len(idx) + 1) // 2:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def balanced_subset(rows: np.ndarray, groups: np.ndarray, rng) -> np.ndarray:
    """As many rows of each group present in ``rows`` as the smallest has, drawn without replacement."""
    by_group = [rows[groups[rows] == g] for g in np.unique(groups[rows])]
    n = min(len(r) for r in by_group)
    return np.sort(np.concatenate([rng.choice(r, n, replace=False) for r in by_group]))


def _worst_group_accuracy(pred, labels, groups) -> float:
    return min(float((pred[groups == g] == labels[groups == g]).mean()) for g in np.unique(groups))


def _fit_averaged(x, y, groups, fit_rows, C, n_subsets, seed, num_classes):
    """Logistic regression (L1, strength 1/C) fit on ``n_subsets`` balanced subsets of
    ``fit_rows``; returns the mean coefficients ``[K', d]``, intercepts and the subsets."""
    from sklearn.linear_model import LogisticRegression

    l1 = _l1_argument()
    rng = np.random.default_rng(seed)
    coefs, intercepts, subsets = [], [], []
    for _ in range(n_subsets):
        rows = balanced_subset(fit_rows, groups, rng)
        if len(np.unique(y[rows])) < num_classes:
            raise ValueError(f"DFR: a balanced subset of the validation half holds classes "
                             f"{sorted(np.unique(y[rows]).tolist())} of {num_classes}; every class "
                             "must appear in the validation split's groups")
        clf = LogisticRegression(C=C, solver="liblinear" if num_classes == 2 else "saga", max_iter=1000,
                                 random_state=0, **l1)
        clf.fit(x[rows], y[rows])
        coefs.append(clf.coef_)
        intercepts.append(clf.intercept_)
        subsets.append(rows)
    return np.mean(coefs, 0), np.mean(intercepts, 0), subsets


def _l1_argument() -> dict:
    # scikit-learn 1.8 deprecates penalty='l1' for l1_ratio=1 (the same L1 penalty)
    import sklearn

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def _logits(coef, intercept, x):
    z = x @ coef.T + intercept
    return np.concatenate([-z / 2, z / 2], 1) if coef.shape[0] == 1 else z


def retrain_last_layer(model, val_ds, *, c_grid, n_subsets: int, seed: int = 0,
                       batch_size: int = 256) -> dict:
    """DFR on ``model``: only its classifier changes, fit on validation rows only.

    The validation split is halved within each group (seeded): half A is where balanced subsets
    are drawn and fit, half B picks ``C`` by worst-group accuracy. Features are standardized
    with half A's statistics; the averaged fit, folded back to raw features, becomes the head.
    Returns what was done: the chosen ``C``, each ``C``'s half-B worst-group accuracy, the halves
    and the row indices (into ``val_ds``) of every balanced subset of the chosen fit.
    """
    from sklearn.preprocessing import StandardScaler

    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"DFR refits a linear classifier; {type(model).__name__}'s is {type(head).__name__}")
    _, feats = predict_dataset(model, val_ds, batch_size, features=True)
    x = feats.double().numpy()
    y = torch.as_tensor(val_ds.labels).numpy()
    groups = torch.as_tensor(val_ds.groups).numpy()
    half_a, half_b = _halves(groups, seed)
    scaler = StandardScaler().fit(x[half_a])
    xs = scaler.transform(x)
    num_classes = head.out_features
    scores, fits = {}, {}
    for C in c_grid:
        fits[C] = _fit_averaged(xs, y, groups, half_a, C, n_subsets, seed, num_classes)
        pred = _logits(fits[C][0], fits[C][1], xs[half_b]).argmax(1)
        scores[C] = _worst_group_accuracy(pred, y[half_b], groups[half_b])
    best = max(c_grid, key=lambda c: scores[c])  # first of the ties: the weakest penalty
    coef, intercept, subsets = fits[best]
    # fold the standardization into the layer: w·(x − μ)/σ + b = (w/σ)·x + (b − w·μ/σ)
    w = coef / scaler.scale_
    b = intercept - (coef * scaler.mean_ / scaler.scale_).sum(1)
    if coef.shape[0] == 1:
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return {"C": best, "val_half_b_worst_group_accuracy": {str(c): s for c, s in scores.items()},
            "half_a": half_a.tolist(), "half_b": half_b.tolist(),
            "subsets": [s.tolist() for s in subsets], "n_subsets": n_subsets}


def _evaluate_split(model, ds, batch_size):
    from .metrics import GroupMetrics

    metrics = GroupMetrics(ds.num_groups, ds.num_classes)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for images, labels, groups in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            metrics.update(model(images.to(device)).float(), labels.to(device), groups.to(device))
    model.train(was)
    return metrics


def _run_dfr(cfg, kw):
    from accelerate import PartialState

    from .report import write_report
    from .workflows.common import Subset

    datasets, model = _staged_inputs(cfg, kw, "dfr")
    out = Path(cfg.output_dir)
    first = _reset(cfg, method="erm", output_dir=str(out / "features"))
    stage1 = _train(first, datasets=datasets, backbone=model, on_epoch_end=kw.get("on_epoch_end"))
    if "test" not in stage1:  # stopped by the caller (a pruned trial): nothing to refit
        return stage1
    val = datasets["val"]
    info = retrain_last_layer(model, val, seed=cfg.seed, c_grid=tuple(cfg.dfr_c_grid),
                              n_subsets=cfg.dfr_subsets,
                              batch_size=cfg.eval_batch_size)
    # "val" is the tuning half B: half A trained the head, so its accuracy would flatter it
    splits = {"val": Subset(val, info["half_b"]), "test": datasets["test"]}
    res = {"output_dir": str(out), "stage1": {k: stage1[k] for k in ("val", "test")}, "dfr": info}
    state = PartialState()
    for split, ds in splits.items():
        metrics = _evaluate_split(model, ds, cfg.eval_batch_size)
        res[split] = metrics.compute()
        if state.is_main_process:
            metrics.save(out / f"predictions_{split}.npz")
    if state.is_main_process:
        tr = datasets["train"]
        (out / "meta.json").write_text(json.dumps(
            {"num_groups": tr.num_groups, "num_classes": tr.num_classes,
             "group_names": list(getattr(tr, "group_names", []) or []),
             "class_names": list(getattr(tr, "class_names", []) or [])}, indent=2) + "\n")
        (out / "dfr.json").write_text(json.dumps(info) + "\n")
        write_report(out, ci=cfg.report_ci, n_boot=cfg.n_boot)
        from safetensors.torch import save_file

        head = model.get_classifier()
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  str(out / "dfr_head.safetensors"))
    state.wait_for_everyone()
    return res


# -- the table -----------------------------------------------------------------------------------

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("erm", "empirical risk minimization (Vapnik, 1992)", "none (validation groups for model selection)",
           (), _one_run, "mean cross-entropy; the baseline every method is compared with",
           dict(penalty="none", lam=0.0)),
    Method("fairlora", "FairLoRA (Sukumaran et al., 2024)", "group labels in train",
           ("lam", "penalty", "penalty_alpha", "dro_step_size", "loss_groups", "balanced_sampling"),
           _one_run, "CE + lam · penalty over the batch's group mean losses (variance by default)"),
    Method("groupdro", "GroupDRO (Sagawa et al., ICLR 2020)", "group labels in train",
           ("dro_step_size", "loss_groups", "balanced_sampling"), _one_run,
           "Σ q_g L_g with q_g ← q_g·exp(dro_step_size·L_g), renormalized each step",
           dict(penalty="dro", lam=1.0)),
    Method("reweight", "group-balanced resampling (e.g. Idrissi et al., CLeaR 2022, SUBG)",
           "group labels in train", ("balanced_sampling",), _one_run,
           "ERM on batches drawn so every group is equally likely (with replacement)",
           dict(balanced_sampling=True, penalty="none")),
    Method("jtt", "JTT, Just Train Twice (Liu et al., ICML 2021)",
           "group labels in validation only (to choose jtt_epochs, jtt_upweight)",
           ("jtt_epochs", "jtt_upweight"), _run_jtt,
           "ERM for jtt_epochs; retrain from the same initialization with its training errors "
           "repeated jtt_upweight times"),
    Method("dfr", "DFR, Deep Feature Reweighting (Kirichenko et al., ICLR 2023)",
           "group labels in validation only", (), _run_dfr,
           "ERM; then only the last layer, refit by L1 logistic regression on group-balanced "
           "subsets of half the validation split (the other half picks the penalty), averaged"),
)}

__all__ = ["METHODS", "METHOD_KEYS", "Method", "balanced_subset", "check", "jtt_error_set", "predict_dataset",
           "retrain_last_layer", "run", "upsample"]
