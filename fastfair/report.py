"""Fairness reports: ``report.json``, ``report.md`` and plots for a run; Pareto scatter for several.

Run-directory contract (what the trainer writes and ``fastfair report RUN_DIR`` reads):

* ``predictions_<split>.npz`` (``GroupMetrics.save``): ``probs`` ``[N, C]`` float, ``labels``
  and ``groups`` ``[N]`` int, optional ``losses`` ``[N]`` float (per-sample cross-entropy;
  ``-log p[label]`` when absent), optional 0-d ``num_groups`` and ``num_classes``;
* ``meta.json`` (optional): ``num_groups``, ``num_classes`` (these win over the npz's; without
  either, ``max + 1`` of the groups and the width of ``probs``), ``group_names``,
  ``class_names``, ``name`` (the run's label in comparisons; default the directory name).

``write_report`` recomputes every metric from the predictions with bootstrap intervals and
writes ``report.json`` (the :func:`fastfair.metrics.compute_metrics` dict, its ``ci``, and
``run``, ``split``, ``group_names``, ``class_names``), ``report.md`` and
``group_accuracy.png``. ``compare_runs`` reads each run's ``report.json`` of that split when
present (for its intervals), else its predictions, and writes ``compare.json``, ``compare.md``
and ``pareto.png``.

Every plot of fastfair goes through :func:`bar_plot` (panels of grouped bars, :class:`Bars`)
or :func:`pareto_plot` (a scatter with its Pareto front and labels placed without overlap);
both draw on a bare Agg Figure and return it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .metrics import (
    METRICS, axis_label, bootstrap, compute_metrics, higher_is_better, metric, scalar_keys,
    scalar_metrics,
)

# What a metrics dict passed to write_report must hold: compute_metrics' own scalars.
_REQUIRED = tuple(k for k in scalar_keys() if METRICS[k].derive is None)


def load_run(run_dir, split: str = "test") -> dict:
    """Predictions and metadata of a run directory (see the module docstring)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} does not exist")
    path = run / f"predictions_{split}.npz"
    if not path.is_file():
        have = sorted(p.name for p in run.glob("predictions_*.npz"))
        raise ValueError(f"{path} not found; the run has {have or 'no predictions_<split>.npz'}")
    with np.load(path) as z:
        for key in ("probs", "labels", "groups"):
            if key not in z:
                raise ValueError(f"{path} has no array {key!r} (it has {sorted(z.files)})")
        data = {k: z[k] for k in z.files}
    meta = {}
    if (run / "meta.json").is_file():
        try:
            meta = json.loads((run / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{run / 'meta.json'} is not valid JSON: {e}") from None
    probs, groups = data["probs"], data["groups"]
    if probs.ndim != 2:
        raise ValueError(f"{path}: probs must be [N, C], got shape {probs.shape}")

    def size(key: str, default: int) -> int:
        if meta.get(key) is not None:
            return int(meta[key])
        return int(data[key]) if key in data else default

    return {
        "name": str(meta.get("name") or run.resolve().name),
        "probs": probs, "labels": data["labels"], "groups": groups,
        "losses": data.get("losses"),
        "num_groups": size("num_groups", int(groups.max()) + 1 if groups.size else 1),
        "num_classes": size("num_classes", probs.shape[1]),
        "group_names": list(meta.get("group_names") or []),
        "class_names": list(meta.get("class_names") or []),
    }


def _names(names, n: int) -> list[str]:
    if names and len(names) != n:
        raise ValueError(f"{len(names)} group names for {n} groups")
    return [str(x) for x in names] if names else [f"group {i}" for i in range(n)]


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _worst(values) -> int | None:
    ok = [(v, i) for i, v in enumerate(values) if v is not None]
    return min(ok)[1] if ok else None


def _markdown(rep: dict) -> str:
    """The scalar table, the group table and the notes; undefined values are left out of the
    tables (with one note naming them) rather than shown as rows of dashes."""
    ci = (rep.get("ci") or {}).get("intervals", {})
    level = (rep.get("ci") or {}).get("level")
    # without intervals the CI column would be all dashes: left out
    col = _Column(f"{round(100 * level)}% CI" if level else "CI", bool(rep.get("ci")))
    n = sum(rep["group_count"])
    lines = [f"# Fairness report: {rep['run']} ({rep['split']}, {n} samples)", "",
             f"| metric | value |{col.head}", f"|---|---|{col.sep}"]
    undefined = []
    for key, value in scalar_metrics(rep).items():
        if value is None:
            undefined.append(key)
            continue
        arrow = "↑" if higher_is_better(key) else "↓"
        # no dash where no interval is computed (not a CI metric): only where it is undefined
        cell = col.cell(ci.get(key)) if METRICS[key].ci else col.blank
        lines.append(f"| {key} {arrow} | {_fmt(value)} |{cell}")
    lines += [""] + _group_table(rep, ci.get("group_accuracy"), col, undefined)
    notes = list(rep["notes"])
    if undefined:
        notes.insert(0, f"left out of the tables, undefined on this split: {', '.join(undefined)}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    if rep.get("ci"):
        lines += ["", f"Intervals: {rep['ci']['method']}, {rep['ci']['n_boot']} resamples, "
                      f"seed {rep['ci']['seed']}."]
    return "\n".join(lines) + "\n"


@dataclass
class _Column:
    """The interval column of a markdown table, or nothing when the report has no intervals."""

    title: str
    shown: bool

    @property
    def head(self) -> str:
        return f" {self.title} |" if self.shown else ""

    @property
    def sep(self) -> str:
        return "---|" if self.shown else ""

    @property
    def blank(self) -> str:
        return "  |" if self.shown else ""

    def cell(self, interval) -> str:
        return f" {_fmt_ci(interval)} |" if self.shown else ""


# Per-group columns after the group's size, accuracy and interval: (header, report key).
_GROUP_COLUMNS = (("AUC", "group_auc"), ("ECE", "group_ece"), ("mean loss", "group_loss"))


def _group_table(rep: dict, group_ci, col: _Column, undefined: list) -> list[str]:
    """One row per group; a column undefined in every group is dropped (and named in
    ``undefined``)."""
    G = len(rep["group_count"])
    group_ci = group_ci or [None] * G
    cols = []
    for head, key in _GROUP_COLUMNS:
        if any(v is not None for v in rep[key]):
            cols.append((head, key))
        else:
            undefined.append(key)
    worst = _worst(rep["group_accuracy"])
    lines = [f"| group | n | accuracy |{col.head}" + "".join(f" {h} |" for h, _ in cols),
             f"|---|---|---|{col.sep}" + "---|" * len(cols)]
    for i, name in enumerate(rep["group_names"]):
        mark = " (worst)" if i == worst else ""
        if rep["group_count"][i] == 0:
            mark = " (missing)"
        lines.append(f"| {name}{mark} | {rep['group_count'][i]} | "
                     f"{_fmt(rep['group_accuracy'][i])} |{col.cell(group_ci[i])}"
                     + "".join(f" {_fmt(rep[key][i])} |" for _, key in cols))
    return lines


# ---------------------------------------------------------------------------------------- plots
# One grouped-bar plot and one Pareto plot for every command: the run report, compare, sweep,
# tune, debias and bias-transfer all draw through these two.

MAX_BARS = 24  # more categories than this in one series: the worst and best KEEP_BARS are shown
KEEP_BARS = 10
_DPI = 120


@dataclass
class Bars:
    """One panel of (grouped) bars: a bar per category and series.

    ``values``: series name -> one value per category (``None``: no bar, marked "missing").
    ``errors``: series name -> per category ``None``, a half-width (``± std``) or an interval
    ``[low, high]``; ``n_seeds``: series name -> seeds behind each bar, whiskers only where 2 or
    more (the legend says how many). ``metric`` (a :data:`METRICS` name) labels the y axis with
    its direction and orders the worst/best selection past :data:`MAX_BARS` categories.
    ``counts`` (per category) go under the names; ``highlight`` is a category drawn red (one
    series only); ``reference`` is ``(value, legend text)`` for a dashed line.
    """

    categories: Sequence[str]
    values: Mapping[str, Sequence]
    metric: str | None = None
    ylabel: str | None = None
    title: str = ""
    errors: Mapping[str, Sequence] | None = None
    n_seeds: Mapping[str, Sequence[int]] | None = None
    error_label: str | None = None
    counts: Sequence[int] | None = None
    highlight: int | None = None
    highlight_label: str = "worst group"
    reference: tuple[float, str] | None = None
    hatches: Mapping[str, str] | None = None
    ylim: tuple[float, float] | None = (0.0, 1.0)  # None: from the values
    noun: str = "categories"  # what the categories are, for the note of a shortened panel


def _figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot, so a user's interactive backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _interval(value, err):
    """``(low, high)`` of a whisker: ``err`` is ``None``, a half-width or ``[low, high]``."""
    if err is None or value is None:
        return None
    if isinstance(err, (int, float)):
        return (value - err, value + err)
    lo, hi = err
    return (lo, hi)


def _seed_note(counts) -> str:
    counts = sorted(set(counts))
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _whisker_label(error_label, drawn_seeds) -> str:
    """Legend text of the whiskers: what they are, and over how many seeds when seeds."""
    if not drawn_seeds:
        return error_label or "interval"
    return f"{error_label or '± 1 std'} over {_seed_note(drawn_seeds)} seeds"


def _check_bars(p: Bars) -> None:
    n = len(p.categories)
    if not p.values:
        raise ValueError("Bars needs at least one series in values")
    for field in ("values", "errors", "n_seeds"):
        for name, seq in (getattr(p, field) or {}).items():
            if name not in p.values:
                raise ValueError(f"Bars.{field} has series {name!r} that values lacks")
            if len(seq) != n:
                raise ValueError(f"Bars.{field}[{name!r}] has {len(seq)} entries for "
                                 f"{n} categories")
    if p.counts is not None and len(p.counts) != n:
        raise ValueError(f"Bars.counts has {len(p.counts)} entries for {n} categories")
    if p.highlight is not None and (len(p.values) > 1 or not 0 <= p.highlight < n):
        raise ValueError(f"Bars.highlight {p.highlight!r} needs one series and a category "
                         f"index in [0, {n})")
    if p.metric is not None:
        metric(p.metric)


def _slots(p: Bars) -> tuple[list[int | None], str]:
    """Category index per x slot (``None``: the gap of a shortened panel) and a note."""
    n = len(p.categories)
    if n <= MAX_BARS or len(p.values) > 1:
        return list(range(n)), ""
    vals = next(iter(p.values.values()))
    sign = 1 if p.metric is None or higher_is_better(p.metric) else -1
    ranked = sorted((i for i in range(n) if vals[i] is not None), key=lambda i: sign * vals[i])
    if len(ranked) <= 2 * KEEP_BARS:
        return ranked, f"{n} {p.noun}: the {len(ranked)} with a value"
    what = METRICS[p.metric].label if p.metric else "value"
    note = (f"{n} {p.noun}: the {KEEP_BARS} worst and the {KEEP_BARS} best by {what}; "
            f"the other {n - 2 * KEEP_BARS} are left out")
    return ranked[:KEEP_BARS] + [None] + ranked[-KEEP_BARS:], note


def _tick(p: Bars, i: int | None) -> str:
    if i is None:
        return "⋯"
    # attribute lists ("digit<5,color=red") break at their commas so neighbours don't overlap
    name = str(p.categories[i]).replace(",", "\n")
    return name if p.counts is None else f"{name}\n(n={p.counts[i]})"


def _panel_width(p: Bars) -> float:
    return 1.0 + 0.42 * len(_slots(p)[0]) * max(1.0, 0.75 * len(p.values))


def _draw_bar(ax, x, v, width, color, hatch, lo, span):
    ax.bar(x, v - lo, width, bottom=lo, color=color, hatch=hatch,
           edgecolor="white" if hatch else color, linewidth=0)
    if abs(v - lo) < 0.015 * span:
        # a bar of (nearly) zero height is invisible: a thick stub in its colour marks it
        ax.plot([x - width / 2, x + width / 2], [lo, lo], color=color, lw=4,
                solid_capstyle="butt", zorder=3, clip_on=False)


def _value_text(ax, x, top, v, rotate: bool, digits: int):
    ax.annotate(f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.3g}", (x, top), xytext=(0, 2),
                textcoords="offset points", ha="center", va="bottom", fontsize=6.5,
                rotation=90 if rotate else 0, color="0.15")


def _auto_ylim(p: Bars) -> tuple[float, float]:
    """From 0 (or the lowest value) to the highest bar or whisker."""
    ends = [0.0]
    for name, vals in p.values.items():
        errs = (p.errors or {}).get(name) or [None] * len(vals)
        for v, e in zip(vals, errs):
            if v is not None:
                ends += [v, *(_interval(v, e) or ())]
    lo, hi = min(ends), max(ends)
    return lo, hi if hi > lo else lo + 1.0


_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive")


@dataclass
class _Drawn:
    """What a panel's bars drew: for its legend and its y limit."""

    top: float
    highlighted: bool = False
    whiskers: bool = False
    seeds: list = field(default_factory=list)


def _draw_series(ax, p: Bars, j: int, slots, lo: float, span: float, rotate: bool,
                 drawn: _Drawn) -> None:
    """One series' bars (a stub for a zero bar), whiskers where due and each value on top."""
    name = list(p.values)[j]
    width = 0.8 / len(p.values)
    vals = p.values[name]
    errs = (p.errors or {}).get(name) or [None] * len(vals)
    seeds = (p.n_seeds or {}).get(name)
    for slot, i in enumerate(slots):
        if i is None:
            continue
        x = slot + (j - (len(p.values) - 1) / 2) * width
        v = vals[i]
        if v is None:
            ax.text(x, lo + 0.02 * span, "missing", rotation=90, ha="center", va="bottom",
                    fontsize=6.5, color="gray")
            continue
        drawn.highlighted |= i == p.highlight
        color = "tab:red" if i == p.highlight else _PALETTE[j % len(_PALETTE)]
        _draw_bar(ax, x, v, width * 0.9, color, (p.hatches or {}).get(name), lo, span)
        top = v
        ci = _interval(v, errs[i])
        if ci is not None and (seeds is None or seeds[i] >= 2):
            ax.errorbar(x, v, yerr=[[max(v - ci[0], 0)], [max(ci[1] - v, 0)]],
                        color="black", capsize=2, lw=0.8)
            top, drawn.whiskers = max(v, ci[1]), True
            drawn.seeds += [] if seeds is None else [seeds[i]]
        _value_text(ax, x, top, v, rotate, 3 if len(p.values) == 1 else 2)
        drawn.top = max(drawn.top, top)


def _legend_handles(ax, p: Bars, drawn: _Drawn) -> list:
    """Series (when several), the highlight, the reference line (drawn here) and whiskers."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_PALETTE[j % len(_PALETTE)], hatch=(p.hatches or {}).get(n),
                     edgecolor="white", label=n) for j, n in enumerate(p.values)] \
        if len(p.values) > 1 else []
    if drawn.highlighted:
        handles.append(Patch(color="tab:red", label=p.highlight_label))
    if p.reference is not None:
        ax.axhline(p.reference[0], color="gray", ls="--", lw=1)
        handles.append(Line2D([], [], color="gray", ls="--", lw=1, label=p.reference[1]))
    if drawn.whiskers:
        handles.append(Line2D([], [], color="black", marker="|", ms=8, ls="none",
                              label=_whisker_label(p.error_label, drawn.seeds)))
    elif p.n_seeds and p.errors:
        handles.append(Patch(alpha=0, label="1 seed: no error bars"))
    return handles


def _draw_panel(ax, p: Bars, fig_width: float, total_slots: int) -> list:
    """Bars, stubs for zero bars, whiskers and a value label above each bar; returns the
    panel's legend handles."""
    slots, note = _slots(p)
    lo, hi = p.ylim if p.ylim is not None else _auto_ylim(p)
    span = hi - lo
    # value labels turn upright when a bar is narrower than about five digits at 6.5 pt
    rotate = 0.8 * fig_width / max(total_slots, 1) * 0.8 / len(p.values) < 0.34
    drawn = _Drawn(top=hi)
    for j in range(len(p.values)):
        _draw_series(ax, p, j, slots, lo, span, rotate, drawn)
    handles = _legend_handles(ax, p, drawn)
    # headroom so the value labels sit inside the axes, above the highest whisker
    ax.set_ylim(lo, drawn.top + span * (0.2 if rotate else 0.09))
    ax.set_xlim(-0.6, len(slots) - 0.4)
    many = len(slots) > 8 or max((len(str(c)) for c in p.categories), default=0) > 14
    ax.set_xticks(range(len(slots)), [_tick(p, i) for i in slots], fontsize=7,
                  rotation=35 if many else 0, ha="right" if many else "center",
                  rotation_mode="anchor" if many else "default")
    ax.set_ylabel(p.ylabel or (axis_label(p.metric) if p.metric else ""), fontsize=8)
    ax.set_title(p.title + (f"\n{note}" if note else ""), fontsize=8.5)
    return handles


def bar_plot(path, panels, title: str | None = None):
    """Grouped bars, one panel per :class:`Bars`, side by side; writes ``path`` (PNG).

    Returns the matplotlib Figure (drawn on the Agg canvas; pyplot is never touched).
    """
    panels = [panels] if isinstance(panels, Bars) else list(panels)
    if not panels:
        raise ValueError("bar_plot needs at least one Bars panel")
    for p in panels:
        _check_bars(p)
    widths = [_panel_width(p) for p in panels]
    legend = 1.7 if any(len(p.values) > 1 or p.reference or p.errors or p.highlight is not None
                        for p in panels) else 0.0
    fig_width = min(max(5.0, sum(widths) + legend), 16.0)
    fig = _figure(fig_width, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    handles = {}
    for ax, p, w in zip(axes, panels, widths):
        for h in _draw_panel(ax, p, fig_width * w / sum(widths), len(_slots(p)[0])):
            handles.setdefault(h.get_label(), h)
    if handles:  # one legend for all panels, outside them: it never covers a bar
        fig.legend(handles=list(handles.values()), loc="outside right center", fontsize=7,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return fig


# ------------------------------------------------------------------ Pareto plot and its labels

# Offsets tried for a label, in points, nearest first; the first clears a marker's 5 pt
# half-size and needs no leader line.
_RADII = (6, 12, 20, 30, 42)
_REL = {"left": 0.0, "bottom": 0.0, "center": 0.5, "right": 1.0, "top": 1.0}
_HA = {1: "left", -1: "right", 0: "center"}  # a label right of its point starts at its left
_VA = {1: "bottom", -1: "top", 0: "center"}
_DIRECTIONS = ((1, 1), (-1, 1), (1, -1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    inside = _overlap(box, frame)
    return box.width * box.height - inside


def _crosses(a, b, c, d) -> bool:
    """Whether the segments ``ab`` and ``cd`` cross."""
    def side(p, q, r):
        return np.sign((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))
    return side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0


def _through(seg, box) -> bool:
    """Whether a leader line passes through a box (sampled along it, away from its ends)."""
    (x0, y0), (x1, y1) = seg
    return any(box.contains(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
               for t in np.linspace(0.2, 0.9, 8))


class _Layout:
    """What a label must keep clear of, in display pixels: markers, whiskers, the other labels
    and their leader lines; and the axes frame it must stay inside."""

    def __init__(self, ax, points_px, marker_r):
        from matplotlib.transforms import Bbox

        self.frame = ax.get_window_extent()
        self.markers = [Bbox.from_extents(x - marker_r, y - marker_r, x + marker_r, y + marker_r)
                        for x, y in points_px]
        self.whiskers = _whisker_boxes(ax)
        self.labels, self.leaders = {}, {}

    def cost(self, i, box, leader) -> float:
        """Pixels covered (whiskers once, markers ten times, labels and the frame's edge fifty
        times) plus a charge per crossing of a leader line: labels stay apart first."""
        labels = [b for j, b in self.labels.items() if j != i]
        leaders = [s for j, s in self.leaders.items() if j != i]
        c = 50 * (_outside(box, self.frame) + sum(_overlap(box, b) for b in labels))
        c += 10 * sum(_overlap(box, b) for b in self.markers)
        c += sum(_overlap(box, b) for b in self.whiskers)
        c += 1000 * sum(_through(s, box) for s in leaders)
        if leader is not None:
            c += 1000 * (sum(_crosses(*leader, *s) for s in leaders)
                         + sum(_through(leader, b) for b in labels)
                         + sum(_through(leader, b) for j, b in enumerate(self.markers) if j != i))
        return c

    def take(self, i, box, leader) -> None:
        self.labels[i] = box.expanded(1.05, 1.1)
        self.leaders.pop(i, None)
        if leader is not None:
            self.leaders[i] = leader


def _candidates(point, size, dpi):
    """``(offset in points, ha, va, box, leader)`` around a point, nearest first."""
    from matplotlib.transforms import Bbox

    w, h = size
    for radius in _RADII:
        for dx, dy in _DIRECTIONS:
            offset = (dx * radius, dy * radius)
            ax_, ay = point[0] + offset[0] * dpi / 72, point[1] + offset[1] * dpi / 72
            x0, y0 = ax_ - w * (1 - dx) / 2, ay - h * (1 - dy) / 2
            leader = (tuple(point), (ax_, ay)) if radius > _RADII[0] else None
            yield (offset, _HA[dx], _VA[dy], Bbox.from_bounds(x0, y0, w, h), leader)


def _place_labels(fig, ax, xy, texts, first=()) -> list:
    """Annotate each point with its text where it covers no other label, marker or whisker.

    Greedy: each label (points in ``first`` go first) takes the nearest offset around its point
    that covers and crosses nothing, else the cheapest; then two more passes let each label move
    now that it sees all the others. A label set off its point gets a leader line.
    """
    from matplotlib.text import Text

    fig.draw_without_rendering()  # run the layout so the axes have their final place ...
    fig.set_layout_engine("none")  # ... and freeze it: moving axes would move the labels
    renderer = fig.canvas.get_renderer()
    px = ax.transData.transform(np.asarray(xy, dtype=float))
    layout = _Layout(ax, px, 5 * fig.dpi / 72)
    sizes = []
    for t in texts:
        probe = Text(0, 0, t, fontsize=7, figure=fig)
        box = probe.get_window_extent(renderer)
        sizes.append((box.width, box.height))
    order = sorted(range(len(xy)), key=lambda i: (i not in first, i))
    chosen = {}
    for _ in range(3):
        for i in order:
            best = None
            for cand in _candidates(px[i], sizes[i], fig.dpi):
                cost = layout.cost(i, cand[3], cand[4])
                if best is None or cost < best[0]:
                    best = (cost, cand)
                if cost == 0:
                    break
            chosen[i] = best[1]
            layout.take(i, best[1][3], best[1][4])
    return [_annotate(ax, xy[i], texts[i], *chosen[i][:3], chosen[i][4] is not None)
            for i in order]


def _annotate(ax, xy, text, offset, ha, va, leader: bool):
    return ax.annotate(
        text, xy, xytext=offset, textcoords="offset points", fontsize=7, ha=ha, va=va,
        arrowprops=None if not leader else dict(
            arrowstyle="-", color="0.55", lw=0.6, shrinkA=0, shrinkB=4,
            # from the text's corner or edge nearest the point, as the layout assumed
            relpos=(_REL[ha], _REL[va])))


def _whisker_boxes(ax) -> list:
    """Display boxes of the error-bar segments (axis-aligned, so their boxes are exact)."""
    from matplotlib.collections import LineCollection
    from matplotlib.transforms import Bbox

    boxes = []
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                (x0, y0), (x1, y1) = ax.transData.transform(np.asarray(seg, dtype=float))[[0, -1]]
                boxes.append(Bbox.from_extents(min(x0, x1) - 1, min(y0, y1) - 1,
                                               max(x0, x1) + 1, max(y0, y1) + 1))
    return boxes


def _key_colors(keys) -> dict:
    from matplotlib import colormaps

    # tab10 without its red, which the worst group and nothing else wears
    tab = [colormaps["tab10"](j) for j in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
    if len(keys) <= len(tab):
        return {k: tab[j] for j, k in enumerate(keys)}
    cmap = colormaps["viridis"]
    return {k: cmap(j / (len(keys) - 1)) for j, k in enumerate(keys)}


def _check_points(points, **per_point) -> list[int]:
    for name, seq in per_point.items():
        if seq is not None and len(seq) != len(points):
            raise ValueError(f"pareto_plot: {len(seq)} {name} for {len(points)} points")
    return [i for i, p in enumerate(points)
            if None not in p and all(math.isfinite(v) for v in p)]


def pareto_plot(path, points, x: str, y: str, *, labels=None, errors=None, n_seeds=None,
                error_label=None, color_by=None, color_name: str = "", title: str = ""):
    """Scatter of ``points`` ``[(x, y), ...]`` for the metrics ``x`` and ``y`` with the front.

    ``labels``: a text per point, placed without overlap; ``errors``: per point
    ``(xerr, yerr)``, each ``None``, a half-width or ``[low, high]``; ``n_seeds``: per point,
    whiskers only where 2 or more (the legend says how many); ``color_by``: a discrete key per
    point (a rank, a method), one colour and legend entry per key, named ``color_name``. The
    front (by each metric's direction) is ringed and joined by a dashed line. Points with a
    ``None`` coordinate are left out and counted in the title. Writes ``path``; returns the
    Figure.
    """
    hx, hy = higher_is_better(x), higher_is_better(y)
    ok = _check_points(points, labels=labels, errors=errors, n_seeds=n_seeds, color_by=color_by)
    front = pareto_front(points, (hx, hy))
    fig = _figure(7.6, 4.8)
    ax = fig.add_subplot()
    keys = list(dict.fromkeys(sorted((color_by[i] for i in ok), key=_natural))) \
        if color_by is not None else [None]
    colors = _key_colors(keys)
    for key in keys:
        idx = [i for i in ok if color_by is None or color_by[i] == key]
        ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], s=36, zorder=3,
                   color=colors[key], edgecolors=["black" if i in front else "none" for i in idx],
                   linewidths=1.3, label=f"{color_name} {key}".strip() if key is not None else "run")
    seeds_drawn = _pareto_whiskers(ax, points, ok, errors, n_seeds,
                                   [colors[color_by[i] if color_by is not None else None]
                                    for i in range(len(points))])
    f = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in f], [points[i][1] for i in f], color="black", ls="--",
            lw=1.1, zorder=2, label="Pareto front (ringed)")
    handles, _ = ax.get_legend_handles_labels()
    if seeds_drawn is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", marker="|", ms=8, ls="none",
                              label=_whisker_label(error_label, seeds_drawn)))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False, borderaxespad=0)
    ax.set_xlabel(axis_label(x), fontsize=8)
    ax.set_ylabel(axis_label(y), fontsize=8)
    left_out = len(points) - len(ok)
    ax.set_title(title + (f" ({left_out} without a value left out)" if left_out else ""),
                 fontsize=9)
    ax.margins(0.12)
    if labels is not None:
        _place_labels(fig, ax, [points[i] for i in ok], [str(labels[i]) for i in ok],
                      first=[k for k, i in enumerate(ok) if i in front])
    fig.savefig(path)
    return fig


def _natural(v):
    """Sort numbers by value and anything else by text, numbers first."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _pareto_whiskers(ax, points, ok, errors, n_seeds, colors):
    """Draw each point's whiskers; returns the seed counts drawn (``None``: no whisker)."""
    if errors is None:
        return None
    drawn, any_drawn = [], False
    for i in ok:
        if n_seeds is not None and n_seeds[i] < 2:
            continue
        xerr, yerr = errors[i]
        kw = {}
        for axis, err, v in (("xerr", xerr, points[i][0]), ("yerr", yerr, points[i][1])):
            ci = _interval(v, err)
            if ci is not None:
                kw[axis] = [[max(v - ci[0], 0)], [max(ci[1] - v, 0)]]
        if kw:
            ax.errorbar(*points[i], fmt="none", ecolor=colors[i], elinewidth=0.8, capsize=2,
                        alpha=0.8, zorder=2, **kw)
            any_drawn = True
            if n_seeds is not None:
                drawn.append(n_seeds[i])
    return drawn if any_drawn else None


def plot_group_accuracy(rep: dict, path):
    """Bars of per-group accuracy with interval whiskers, the worst group in red."""
    acc = rep["group_accuracy"]
    ci = rep.get("ci") or {}
    level = ci.get("level")
    intervals = (ci.get("intervals") or {}).get("group_accuracy")
    panel = Bars(
        categories=rep["group_names"], values={"accuracy": acc}, metric="accuracy",
        ylabel="accuracy", counts=rep["group_count"], highlight=_worst(acc), noun="groups",
        errors={"accuracy": intervals} if intervals else None,
        error_label=f"{round(100 * level)}% bootstrap interval" if level else None,
        reference=(rep["accuracy"], f"overall {rep['accuracy']:.3f}"),
        title=f"{rep['run']} ({rep['split']}): accuracy per group"
              + ("; report.md lists them all" if len(acc) > MAX_BARS else ""))
    return bar_plot(path, panel)


def write_report(
    source, out_dir=None, split: str = "test", ci: bool = True, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, group_names=None,
) -> dict:
    """Write ``report.json``, ``report.md`` and ``group_accuracy.png``; returns the report dict.

    ``source`` is a run directory (metrics recomputed from ``predictions_<split>.npz``, with
    intervals unless ``ci=False``) or a dict from :func:`compute_metrics` /
    ``GroupMetrics.compute`` (its ``ci``, if any, is used as is). ``out_dir`` defaults to the run
    directory; it is required for a dict.
    """
    if isinstance(source, dict):
        if out_dir is None:
            raise ValueError("write_report of a metrics dict needs out_dir")
        missing = [k for k in _REQUIRED + ("group_accuracy", "group_count") if k not in source]
        if missing:
            raise ValueError(f"metrics dict lacks {missing}: pass a compute_metrics() result")
        rep = dict(source)
        rep.setdefault("run", "metrics")
        rep.setdefault("split", split)
        names = group_names or source.get("group_names")
        rep["group_names"] = _names(names, len(source["group_count"]))
    else:
        run = load_run(source, split)
        out_dir = source if out_dir is None else out_dir
        args = (run["probs"], run["labels"], run["groups"], run["num_groups"], run["num_classes"])
        rep = {"run": run["name"], "split": split}
        rep.update(compute_metrics(*args, losses=run["losses"]))
        if ci:
            rep["ci"] = bootstrap(*args, losses=run["losses"], n_boot=n_boot, seed=seed,
                                  level=level)
        rep["group_names"] = _names(group_names or run["group_names"], run["num_groups"])
        rep["class_names"] = run["class_names"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(rep))
    plot_group_accuracy(rep, out / "group_accuracy.png")
    return rep


def pareto_front(points, higher=(True, True)) -> list[int]:
    """Indices of the points ``(x, y)`` that no other point dominates; ``None``s are never on it."""
    sign = np.array([1.0 if h else -1.0 for h in higher])
    ok = [i for i, p in enumerate(points) if None not in p and all(map(math.isfinite, p))]
    front = []
    for i in ok:
        a = sign * np.array(points[i])
        others = (sign * np.array(points[j]) for j in ok)
        if not any(np.all(b >= a) and np.any(b > a) for b in others):
            front.append(i)
    return front


def _run_metrics(run_dir, split: str) -> dict:
    if isinstance(run_dir, dict):
        return run_dir
    path = Path(run_dir) / "report.json"
    if path.is_file():
        rep = json.loads(path.read_text())
        if rep.get("split") == split:
            return rep
    run = load_run(run_dir, split)
    rep = {"run": run["name"]}
    rep.update(compute_metrics(run["probs"], run["labels"], run["groups"], run["num_groups"],
                               run["num_classes"], losses=run["losses"]))
    return rep


def compare_runs(run_dirs, out_dir, x: str = "accuracy", y: str = "worst_group_accuracy",
                 split: str = "test", labels=None) -> list[dict]:
    """Scatter ``x`` against ``y`` for several runs (a rank or λ sweep) with the Pareto front.

    ``run_dirs``: run directories, or report dicts from :func:`write_report`. Writes
    ``compare.json``, ``compare.md`` and ``pareto.png`` into ``out_dir``. Returns one row per
    run: ``run``, the ``x`` and ``y`` values, their intervals (``<key>_ci``, when the run's
    report has them) and ``pareto`` (on the front, by each metric's better direction).
    """
    hx, hy = higher_is_better(x), higher_is_better(y)
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    rows, levels = [], set()
    for i, d in enumerate(run_dirs):
        rep = _run_metrics(d, split)
        intervals = (rep.get("ci") or {}).get("intervals") or {}
        if intervals:
            levels.add(rep["ci"]["level"])
        name = labels[i] if labels else rep.get("run") or Path(str(d)).name
        values = scalar_metrics(rep, (x, y))
        rows.append({"run": name, x: values.get(x), y: values.get(y),
                     f"{x}_ci": intervals.get(x), f"{y}_ci": intervals.get(y)})
    front = set(pareto_front([(r[x], r[y]) for r in rows], (hx, hy)))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"x": x, "y": y, "split": split, "runs": rows}, indent=2) + "\n")
    md = [f"| run | {x} {'↑' if hx else '↓'} | {y} {'↑' if hy else '↓'} | Pareto |",
          "|---|---|---|---|"]
    md += [f"| {r['run']} | {_fmt(r[x])} | {_fmt(r[y])} {_fmt_ci(r[f'{y}_ci'])} | "
           f"{'yes' if r['pareto'] else ''} |" for r in rows]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    pareto_plot(out / "pareto.png", [(r[x], r[y]) for r in rows], x, y,
                labels=[r["run"] for r in rows],
                errors=[(r[f"{x}_ci"], r[f"{y}_ci"]) for r in rows],
                error_label=" / ".join(f"{round(100 * v)}%" for v in sorted(levels))
                + " bootstrap interval", title=f"{len(rows)} runs, {split} split")
    return rows


REPORT_FILES = ("report.json", "report.md", "group_accuracy.png")
COMPARE_FILES = ("compare.json", "compare.md", "pareto.png")


def _claim(out: Path, files, overwrite: bool) -> str | None:
    """Refuse to write over an earlier report in ``out`` unless ``overwrite``; returns a line
    saying what gets replaced (``None`` when nothing is there)."""
    old = [f for f in files if (out / f).exists()]
    if not old:
        return None
    try:
        prev = json.loads((out / "report.json").read_text())
        ci = prev.get("ci") or {}
        what = f" (split {prev.get('split')}, " + (
            f"{ci['n_boot']} resamples)" if ci.get("n_boot") else "no intervals)")
    except (OSError, ValueError, AttributeError):
        what = ""
    if not overwrite:
        raise ValueError(f"{out} already holds {', '.join(old)}{what}: pass --out DIR to write "
                         f"elsewhere, or --overwrite to replace them")
    return f"replaced {', '.join(old)}{what} in {out}, as --overwrite asked"


def _targets(args) -> tuple[list[Path], Path | None]:
    """Where each run's report goes, and the comparison (with several runs)."""
    if len(args.runs) == 1:
        return [Path(args.out) if args.out else Path(args.runs[0]) / "report"], None
    outs, used = [], {}
    for run in args.runs:
        if not args.out:
            outs.append(Path(run) / "report")
            continue
        name = Path(run).resolve().name
        used[name] = used.get(name, 0) + 1
        outs.append(Path(args.out) / (name if used[name] == 1 else f"{name}_{used[name]}"))
    return outs, Path(args.out or "compare")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastfair report",
        description="Fairness report of a run directory (report.json, report.md, "
                    "group_accuracy.png); with several runs, also their accuracy-vs-fairness "
                    "scatter with the Pareto front (compare.json, compare.md, pareto.png). "
                    "An existing report is never replaced without --overwrite.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder: one run's report, or the comparison of "
                                 "several, each run's report then in OUT/<run name> "
                                 "(default: RUN_DIR/report, and ./compare for the comparison; "
                                 "the report the trainer wrote into RUN_DIR stays as it is)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report already in the output folder (default: refuse)")
    p.add_argument("--split", default="test", help="which predictions_<split>.npz (default test)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--no-ci", action="store_true", help="skip the bootstrap intervals")
    p.add_argument("--x", default="accuracy", choices=scalar_keys(), metavar="METRIC",
                   help="comparison x axis (default accuracy)")
    p.add_argument("--y", default="worst_group_accuracy", choices=scalar_keys(),
                   metavar="METRIC", help=f"comparison y axis (default worst_group_accuracy); "
                                          f"either axis is one of {', '.join(scalar_keys())}")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fastfair report RUN_DIR [RUN_DIR ...] [--out DIR] [--overwrite]``."""
    args = _parser().parse_args(argv)
    kw = dict(split=args.split, ci=not args.no_ci, n_boot=args.n_boot, seed=args.seed,
              level=args.level)
    try:
        outs, compare_out = _targets(args)
        # every refusal before the first file is written: a refused call changes nothing
        replaced = [_claim(o, REPORT_FILES, args.overwrite) for o in outs]
        if compare_out is not None:
            replaced.append(_claim(compare_out, COMPARE_FILES, args.overwrite))
        reports = []
        for run, out in zip(args.runs, outs):
            rep = write_report(run, out, **kw)
            reports.append(rep)
            print(f"{rep['run']}: worst_group_accuracy {_fmt(rep['worst_group_accuracy'])}; "
                  f"wrote {out / 'report.md'}")
        if compare_out is not None:
            compare_runs(reports, compare_out, x=args.x, y=args.y, split=args.split)
            print(f"wrote {compare_out / 'compare.md'}")
        for line in filter(None, replaced):
            print(line)
    except ValueError as e:
        print(f"fastfair report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
