"""Small pieces every workflow command shares: list flags and result files."""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path


def comma_list(kind):
    """An argparse type for ``--flag 1,4,16``."""
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


def fmt_mean_std(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def write_rows(out_dir: Path, rows: list[dict], payload: dict) -> None:
    """``results.csv`` (one row per run) and ``results.json`` (``payload`` plus the rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")


def summarize_seeds(rows: list[dict], keys: tuple[str, ...], metrics) -> list[dict]:
    """One row per distinct ``keys`` tuple (first-seen order): each metric's mean over seeds and
    its sample standard deviation (``None`` with one seed); missing or NaN values are left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, sel in groups.items():
        s = {**dict(zip(keys, key)), "n_seeds": len(sel)}
        for m in metrics:
            v = [r[m] for r in sel if r[m] is not None and not (isinstance(r[m], float) and math.isnan(r[m]))]
            s[m] = statistics.fmean(v) if v else None
            s[m + "_std"] = statistics.stdev(v) if len(v) > 1 else None
        out.append(s)
    return out
