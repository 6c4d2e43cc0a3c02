"""The trainer: LoRA (or full / linear) fine-tuning of a timm model with a fairness loss, on accelerate.

One CPU, one GPU, DDP or FSDP come from the accelerate config (``accelerate launch``), with no
change here. A run directory holds ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/step_N`` (``accelerator.save_state``, written under a temporary name and renamed,
so a kill never leaves a half-written checkpoint as the latest), ``predictions_{val,test}.npz``,
the fairness report, and the adapter in PEFT format (or ``model/`` for full fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset

from .adapters import save_adapter
from .config import TrainConfig, add_config_arguments, config_from_args, dump
from .data import build_datasets, group_balanced_sampler, validate_dataset
from .losses import FairnessLoss
from .metrics import GroupMetrics
from .models import create_backbone, setup_finetuning, trainable_parameters

# What the side-by-side summary and the per-epoch log show of the metrics.
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "worst_group_accuracy", "accuracy_gap",
                "equalized_odds_difference", "demographic_parity_difference", "auc", "loss_variance")


class WithIndex(Dataset):
    """Items ``(image, label, group, index)``: the index reaches per-sample attributes."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, label, group = self.ds[i]
        return image, label, group, i


class TrainerState:
    """Progress saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0

    def state_dict(self):
        return dict(step=self.step, epoch=self.epoch, batches_in_epoch=self.batches_in_epoch)

    def load_state_dict(self, state):
        self.step, self.epoch, self.batches_in_epoch = (state["step"], state["epoch"],
                                                         state["batches_in_epoch"])


def loss_group_table(cfg: TrainConfig, ds) -> tuple[torch.Tensor, int]:
    """Per-sample group ids for the loss, and their count, by ``cfg.loss_groups``."""
    if cfg.loss_groups == "group":
        return torch.as_tensor(ds.groups).long(), ds.num_groups
    if cfg.loss_groups == "class":
        return torch.as_tensor(ds.labels).long(), ds.num_classes
    attrs = getattr(ds, "attributes", None)
    if attrs is None:
        raise ValueError(f"loss_groups='attribute' needs a dataset with an attribute per sample; "
                         f"{type(ds).__name__} has none (use 'group' or 'class')")
    attrs = torch.as_tensor(attrs).long()
    return attrs, int(attrs.max()) + 1


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio``; a picklable-free closure is fine
    because LambdaLR's state is its step count."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total_steps - warm, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int) -> Path:
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = out / "checkpoints" / f".tmp_step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: 'latest' is always a complete checkpoint
        for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_groups: int, num_classes: int) -> GroupMetrics:
    model.eval()
    metrics = GroupMetrics(num_groups, num_classes)
    for images, labels, groups, _ in loader:
        with accelerator.autocast():
            logits = model(images)
        metrics.update(logits.float(), labels, groups, accelerator=accelerator)
    model.train()
    return metrics


def scalars(m: dict) -> dict:
    return {k: m[k] for k in SUMMARY_KEYS if k in m}


def train(cfg: TrainConfig, resume: str | None = None, stop_after_steps: int | None = None,
          datasets: dict | None = None, backbone: torch.nn.Module | None = None,
          on_epoch_end=None) -> dict:
    """Run one training; returns ``{"output_dir", "val", "test"}`` (metric dicts).

    ``resume``: a run directory whose latest checkpoint to continue from (its config is used).
    ``stop_after_steps``: checkpoint and return after that many optimizer steps in total, as a
    preemption would (the schedule is that of the full run).
    Workflows plug in here: ``datasets`` (``{"train", "val", "test"}``, fastfair datasets)
    replaces the config's data; ``backbone`` (a model with the task's head) replaces
    ``create_backbone`` and gets the config's fine-tuning set-up; ``on_epoch_end(epoch,
    val_metrics)`` is called on every process after each validation and stops the run when it
    returns True (optuna pruning); such a run returns its last ``"val"`` without ``"test"``.
    """
    cfg.validate()
    out = Path(resume or cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with if cfg.log_with else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(f"fastfair train: resolved config\n{dump(cfg)}", flush=True)
        cfg.save(out / "config.yaml")

    # Data first: bad rows fail before any model is built or step is taken.
    if datasets is None:
        datasets = build_datasets_for(cfg)
    else:
        for split in ("train", "val", "test"):
            validate_dataset(datasets[split], verify_images=False)
    train_ds = datasets["train"]
    num_classes, num_groups = train_ds.num_classes, train_ds.num_groups
    loss_table, num_loss_groups = loss_group_table(cfg, train_ds)

    set_seed(cfg.seed)
    model = backbone if backbone is not None else create_backbone(cfg, num_classes=num_classes)
    summary = setup_finetuning(model, cfg)
    if accelerator.is_main_process:
        print(f"fastfair train: {cfg.model}, {summary}", flush=True)

    g = torch.Generator().manual_seed(cfg.seed)
    sampler = group_balanced_sampler(train_ds, seed=cfg.seed) if cfg.balanced_sampling else None
    train_loader = DataLoader(WithIndex(train_ds), batch_size=cfg.batch_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=cfg.num_workers, drop_last=True, generator=g)
    eval_loaders = {s: DataLoader(WithIndex(datasets[s]), batch_size=cfg.eval_batch_size,
                                  num_workers=cfg.num_workers) for s in ("val", "test")}
    loss_fn = FairnessLoss(num_loss_groups, lam=cfg.lam, penalty=cfg.penalty, alpha=cfg.penalty_alpha,
                           step_size=cfg.dro_step_size, label_smoothing=cfg.label_smoothing,
                           backend=cfg.backend)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loaders["val"], eval_loaders["test"])
    loss_fn = loss_fn.to(accelerator.device)
    loss_table = loss_table.to(accelerator.device)

    if len(train_loader) == 0:  # drop_last: no full batch, and so not a single step
        raise ValueError(f"the train split has {len(train_ds)} samples, fewer than one batch of "
                         f"batch_size={cfg.batch_size} on each of {accelerator.num_processes} "
                         "process(es); lower batch_size")
    # accelerate also steps at the end of the loader, so a last partial window is a step too
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    tail = len(train_loader) % cfg.grad_accum  # batches in that partial window (0: none)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once
    # per process), and checkpointed with the rest.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = TrainerState()
    for obj in (scheduler, loss_fn, state):
        accelerator.register_for_checkpointing(obj)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume {out}: no checkpoint under {out / 'checkpoints'}")
        accelerator.load_state(str(ckpt))
        if accelerator.is_main_process:
            print(f"fastfair train: resumed from {ckpt} at step {state.step}", flush=True)
    if cfg.log_with:
        accelerator.init_trackers("fastfair", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                     for k, v in cfg.to_dict().items()})

    log_path = out / "metrics.jsonl"
    progress = _progress(accelerator, total_steps, state.step)
    model.train()
    t0, running, n_running = time.time(), None, 0
    done = state.step >= total_steps
    stopped = None  # the validation metrics at which on_epoch_end stopped the run
    # a run stopped at its last step resumes with no step left but that epoch's validation
    while (not done or state.batches_in_epoch) and state.epoch < cfg.epochs:
        train_loader.set_epoch(state.epoch)
        if sampler is not None:  # one draw per epoch, so a resumed epoch replays the same batches
            sampler.generator.manual_seed(cfg.seed * 100_003 + state.epoch)
        loader = train_loader
        if done:
            loader = []
        elif state.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for images, labels, _, index in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(images)
                out_loss = loss_fn(logits, labels, loss_table[index])  # fp32 accumulation inside
                loss = out_loss.loss
                if tail and state.batches_in_epoch >= len(train_loader) - tail:
                    loss = loss * (cfg.grad_accum / tail)  # backward divides by grad_accum, not tail
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            loss_d = out_loss.loss.detach()
            running = loss_d if running is None else running + loss_d
            n_running += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it
                scheduler.step()
            state.step += 1
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                loss_fn.check()  # bad labels or groups surface here, where the host reads anyway
                value = (running / n_running).item()
                running, n_running = None, 0
                accelerator.log({"train/loss": value, "lr": scheduler.get_last_lr()[0]}, step=state.step)
                progress.set_postfix(loss=f"{value:.4f}")
            if cfg.save_every and state.step % cfg.save_every == 0:
                save_checkpoint(accelerator, out, state.step, cfg.keep_checkpoints)
            if stop_after_steps is not None and state.step >= stop_after_steps:
                save_checkpoint(accelerator, out, state.step, cfg.keep_checkpoints)
                progress.close()
                accelerator.end_training()
                return {"output_dir": str(out), "stopped_at": state.step}
            if state.step >= total_steps:
                done = True
                break
        if done or state.batches_in_epoch >= len(train_loader):
            val = evaluate(model, val_loader, accelerator, num_groups, num_classes).compute()
            record = {"epoch": state.epoch, "step": state.step, "time_s": round(time.time() - t0, 2),
                      **{f"val/{k}": v for k, v in scalars(val).items()}}
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            state.epoch += 1
            state.batches_in_epoch = 0
            if on_epoch_end is not None and on_epoch_end(state.epoch - 1, val):
                stopped = val
                break
    progress.close()
    save_checkpoint(accelerator, out, state.step, cfg.keep_checkpoints)
    if stopped is not None:  # stopped by the caller (a pruned trial): no test evaluation or report
        accelerator.end_training()
        return {"output_dir": str(out), "val": stopped, "stopped_at_epoch": state.epoch - 1}
    results = finish(cfg, model, accelerator, val_loader, test_loader, out, num_groups, num_classes, train_ds)
    accelerator.end_training()
    return results


def finish(cfg, model, accelerator, val_loader, test_loader, out: Path, num_groups, num_classes, train_ds):
    """Final evaluation on val and test, predictions, report and adapter."""
    from .report import write_report

    results = {"output_dir": str(out)}
    for split, loader in (("val", val_loader), ("test", test_loader)):
        metrics = evaluate(model, loader, accelerator, num_groups, num_classes)
        results[split] = metrics.compute()
        if accelerator.is_main_process:
            metrics.save(out / f"predictions_{split}.npz")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"num_groups": num_groups, "num_classes": num_classes,
                "group_names": list(getattr(train_ds, "group_names", []) or []),
                "class_names": list(getattr(train_ds, "class_names", []) or [])}
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_report(out, ci=cfg.report_ci, n_boot=cfg.n_boot)
        unwrapped = accelerator.unwrap_model(model)
        if cfg.finetune == "lora":
            save_adapter(unwrapped, out / "adapter", adapter_name=cfg.adapter_name)
        else:
            accelerator.save_model(unwrapped, str(out / "model"))
    accelerator.wait_for_everyone()
    return results


def build_datasets_for(cfg: TrainConfig) -> dict:
    """The config's datasets, normalized with the model's own mean and std (CLIP differs)."""
    import timm

    opts = cfg.to_dict()
    opts["image_size"] = cfg.image_size or cfg.img_size or 224
    opts["seed"] = cfg.seed if cfg.data_seed is None else cfg.data_seed
    # the data config of an architecture, without building (or downloading) the model
    pcfg = timm.models.get_pretrained_cfg(cfg.model)
    if pcfg is not None and pcfg.mean is not None:
        opts.update(mean=tuple(pcfg.mean), std=tuple(pcfg.std))
    return build_datasets(opts)


def _progress(accelerator, total, initial):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process,
                desc="train", dynamic_ncols=True, file=sys.stdout)


def side_by_side(runs: dict[str, dict], split: str = "test") -> str:
    """A markdown table: one column per run, one row per summary metric."""
    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in SUMMARY_KEYS:
        cells = []
        for n in names:
            v = runs[n][split].get(key)
            cells.append("n/a" if v is None else f"{v:.4f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEMO_LAM = 1.0


def demo(argv_cfg: TrainConfig) -> int:
    """The main job: the same run with lam = 0 and with FairLoRA's lam, reported side by side."""
    base = argv_cfg.output_dir if argv_cfg.output_dir != TrainConfig.output_dir else "runs/demo"
    runs = {}
    for name, lam in (("ERM (lam=0)", 0.0), (f"FairLoRA (lam={DEMO_LAM:g})", DEMO_LAM)):
        cfg = TrainConfig(**{**argv_cfg.to_dict(), "lam": lam,
                             "output_dir": str(Path(base) / ("erm" if lam == 0 else "fairlora"))})
        runs[name] = train(cfg)
    if Accelerator().is_main_process:
        print("\nfastfair demo: colored digits (color spuriously tied to the digit in training, "
              "uncorrelated in test); test split\n")
        print(side_by_side(runs))
        print(f"\nreports: {base}/erm/report.md, {base}/fairlora/report.md (and group_accuracy.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastfair train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of config keys; flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--demo", action="store_true",
                   help=f"train twice, lam=0 and lam={DEMO_LAM:g}, and print both reports side by side")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise SystemExit(f"--resume {args.resume}: {cfg_path} not found")
        args.config = str(cfg_path)
    cfg = config_from_args(args)
    if args.demo:
        return demo(cfg)
    res = train(cfg, resume=args.resume)
    if Accelerator().is_main_process:
        print(side_by_side({cfg.output_dir: res}))
    return 0
