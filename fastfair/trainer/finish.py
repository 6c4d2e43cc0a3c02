"""``finish``: the final evaluation at the selected epoch, predictions, report and adapter."""
from __future__ import annotations

import json
from pathlib import Path

from ..adapters import save_adapter
from . import checkpoint
from .loop import evaluate
from .run import Run


def _restore_selected(run: Run) -> None:
    """Load the selected epoch's weights, keeping the run's own progress."""
    best = run.state.best_step
    if best is None or best == run.state.step:
        return
    ckpt = run.out / "checkpoints" / f"step_{best:08d}"
    progress = run.state.state_dict()
    checkpoint.load(run.accelerator, ckpt, with_rng=True)
    run.state.load_state_dict(progress)


def _write_meta(run: Run, selection: dict) -> None:
    ds = run.train_ds
    meta = {"num_groups": run.num_groups, "num_classes": run.num_classes,
            "group_names": list(getattr(ds, "group_names", []) or []),
            "class_names": list(getattr(ds, "class_names", []) or []), "selection": selection}
    (run.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    with (run.out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(selection) + "\n")


def finish(run: Run) -> dict:
    """Evaluate val and test at the selected epoch and write the run's outputs; returns
    ``{"output_dir", "val", "test", "selected_epoch", "selection"}``."""
    from ..report import write_report

    acc, out = run.accelerator, run.out
    selection = run.selection.record(run.state)
    _restore_selected(run)
    results = {"output_dir": str(out), "selected_epoch": selection["selected_epoch"], "selection": selection}
    for split, loader in (("val", run.val_loader), ("test", run.test_loader)):
        metrics = evaluate(run.model, loader, acc, run.num_groups, run.num_classes)
        results[split] = metrics.compute()
        if acc.is_main_process:
            metrics.save(out / f"predictions_{split}.npz")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_meta(run, selection)
        write_report(out, ci=run.cfg.report_ci, n_boot=run.cfg.n_boot)
        unwrapped = acc.unwrap_model(run.model)
        if run.cfg.finetune == "lora":
            save_adapter(unwrapped, out / "adapter", adapter_name=run.cfg.adapter_name)
        else:
            acc.save_model(unwrapped, str(out / "model"))
        print(f"[{run.name}] test at epoch {selection['selected_epoch']} ({selection['reason']}); "
              f"report: {Path(out) / 'report.md'}", flush=True)
    acc.wait_for_everyone()
    return results
