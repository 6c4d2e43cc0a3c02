"""``prepare``: everything a run needs before its first step, checked in the order that keeps a
failed start harmless (config, run directory, data, model; only then is the directory written)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data import group_balanced_sampler, validate_dataset
from ..losses import FairnessLoss
from ..models import create_backbone, setup_finetuning, trainable_parameters
from . import checkpoint, rundir
from .data import WithIndex, build_datasets_for, loss_group_table
from .guard import NonFiniteGuard
from .select import Selection, check_name


class TrainerState:
    """Progress saved with every checkpoint (``register_for_checkpointing``)."""

    KEYS = ("step", "epoch", "batches_in_epoch", "skipped", "best_value", "best_epoch", "best_step")

    def __init__(self):
        self.step = self.epoch = self.batches_in_epoch = self.skipped = 0
        self.best_value = self.best_epoch = self.best_step = None

    def state_dict(self):
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state):
        for k in self.KEYS:
            setattr(self, k, state.get(k, getattr(self, k)))


@dataclass
class Run:
    """A prepared run: what ``fit`` trains and ``finish`` evaluates and writes."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: FairnessLoss
    loss_table: torch.Tensor
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    sampler: object
    train_ds: object
    total_steps: int
    tail: int  # batches in the epoch's last, partial accumulation window (0: none)
    selection: Selection
    guard: NonFiniteGuard
    state: TrainerState = field(default_factory=TrainerState)
    resumed_from: Path | None = None
    saved_state: dict | None = None  # the TrainerState of the newest checkpoint this process wrote

    @property
    def num_classes(self) -> int:
        return self.train_ds.num_classes

    @property
    def num_groups(self) -> int:
        return self.train_ds.num_groups

    @property
    def name(self) -> str:
        return self.out.name


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (LambdaLR's state is its step count)."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total_steps - warm, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def _datasets(cfg: TrainConfig, datasets: dict | None) -> dict:
    if datasets is None:
        return build_datasets_for(cfg)
    for split in ("train", "val", "test"):
        validate_dataset(datasets[split], verify_images=False)
    return datasets


def _loaders(cfg: TrainConfig, datasets: dict):
    g = torch.Generator().manual_seed(cfg.seed)
    sampler = group_balanced_sampler(datasets["train"], seed=cfg.seed) if cfg.balanced_sampling else None
    train = DataLoader(WithIndex(datasets["train"]), batch_size=cfg.batch_size, shuffle=sampler is None,
                       sampler=sampler, num_workers=cfg.num_workers, drop_last=True, generator=g)
    val, test = (DataLoader(WithIndex(datasets[s]), batch_size=cfg.eval_batch_size,
                            num_workers=cfg.num_workers) for s in ("val", "test"))
    return sampler, train, val, test


def _check_out_dir(cfg: TrainConfig, resume) -> tuple[Path, list[str]]:
    """The run directory and what --overwrite will remove from it; no writes yet."""
    if resume is None:
        out = Path(cfg.output_dir)
        return out, rundir.check_new_run_dir(cfg, out)
    out = Path(resume)
    rundir.check_resume(cfg, out)
    return out, []


def prepare(cfg: TrainConfig, resume=None, datasets: dict | None = None,
            backbone: torch.nn.Module | None = None) -> Run:
    """Accelerator, data, model, loss, optimizer, scheduler, and the checkpoint to resume from.

    ``resume``: a run directory to continue (``cfg`` must match its config but for resumable keys).
    ``datasets``/``backbone``: replace the config's data / ``create_backbone`` (workflows).
    """
    cfg.validate()
    check_name(cfg.select_by)  # needs the metric table, which config.py does not import
    out, to_clear = _check_out_dir(cfg, resume)
    accelerator = _accelerator(cfg, out)
    set_seed(cfg.seed)
    datasets = _datasets(cfg, datasets)  # bad rows fail before any model is built
    train_ds = datasets["train"]
    selection = Selection.resolve(cfg.select_by, train_ds.num_groups)
    loss_table, num_loss_groups = loss_group_table(cfg, train_ds)
    set_seed(cfg.seed)
    model = backbone if backbone is not None else create_backbone(cfg, num_classes=train_ds.num_classes)
    summary = setup_finetuning(model, cfg)
    sampler, train_loader, val_loader, test_loader = _loaders(cfg, datasets)
    loss_fn = FairnessLoss(num_loss_groups, lam=cfg.lam, penalty=cfg.penalty, alpha=cfg.penalty_alpha,
                           step_size=cfg.dro_step_size, label_smoothing=cfg.label_smoothing, backend=cfg.backend)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    total_steps, tail = _schedule(cfg, train_loader, len(train_ds), accelerator.num_processes)
    # Stepped by hand once per optimizer step (accelerate would step a prepared one once per
    # process), and checkpointed with the rest.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    run = Run(cfg, out, accelerator, model, optimizer, scheduler, loss_fn.to(accelerator.device),
              loss_table.to(accelerator.device), train_loader, val_loader, test_loader, sampler, train_ds,
              total_steps, tail, selection, NonFiniteGuard(cfg.nan_policy, accelerator))
    for obj in (run.scheduler, run.loss_fn, run.state):
        accelerator.register_for_checkpointing(obj)
    _start(run, resume, to_clear, summary)
    return run


def _schedule(cfg: TrainConfig, train_loader, n_train: int, n_proc: int) -> tuple[int, int]:
    if len(train_loader) == 0:  # drop_last: no full batch, and so not a single step
        raise ValueError(f"the train split has {n_train} samples, fewer than one batch of "
                         f"batch_size={cfg.batch_size} on each of {n_proc} process(es); lower batch_size")
    # accelerate also steps at the end of the loader, so a last partial window is a step too
    total = cfg.epochs * math.ceil(len(train_loader) / cfg.grad_accum)
    return (min(total, cfg.max_steps) if cfg.max_steps else total), len(train_loader) % cfg.grad_accum


def _start(run: Run, resume, to_clear: list[str], summary) -> None:
    """Claim the directory (or load the checkpoint), then write config.yaml: a failed resume
    leaves the run's config as it was."""
    acc, cfg, out = run.accelerator, run.cfg, run.out
    if resume is None:
        if acc.is_main_process:
            rundir.clear(out, to_clear)
            out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
    else:
        ckpt, with_rng = checkpoint.usable(out, cfg.resume_without_rng_state)
        checkpoint.load(acc, ckpt, with_rng)
        run.resumed_from = ckpt
        if acc.is_main_process:
            rundir.truncate_metrics(out, run.state.epoch)
    if acc.is_main_process:
        cfg.replace(output_dir=str(out)).save(out / "config.yaml")
        resumed = f", resumed from {run.resumed_from.name} (step {run.state.step})" if resume else ""
        print(f"[{run.name}] {cfg.summary()}; {summary}{resumed}; config: {out / 'config.yaml'}", flush=True)
    if cfg.log_with:
        acc.init_trackers("fastfair", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                              for k, v in cfg.to_dict().items()})


