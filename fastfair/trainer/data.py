"""The run's data: datasets from the config, per-sample indices, and the loss's group ids."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..data import build_datasets

DATA_OPTIONS = ("data", "correlation", "binary", "repeats", "csv_path", "image_root", "path_col",
                "label_col", "group_col", "split_col", "verify_images", "allow_outside_root")


class WithIndex(Dataset):
    """Items ``(image, label, group, index)``: the index reaches per-sample attributes."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, label, group = self.ds[i]
        return image, label, group, i


def data_options(cfg: TrainConfig) -> dict:
    """The data options of ``cfg``, normalized with the model's own mean and std (CLIP differs)."""
    import timm

    opts = {k: getattr(cfg, k) for k in DATA_OPTIONS}
    opts["image_size"] = cfg.image_size or cfg.img_size or 224
    opts["seed"] = cfg.seed if cfg.data_seed is None else cfg.data_seed
    # the data config of an architecture, without building (or downloading) the model
    pcfg = timm.models.get_pretrained_cfg(cfg.model)
    if pcfg is not None and pcfg.mean is not None:
        opts.update(mean=tuple(pcfg.mean), std=tuple(pcfg.std))
    return opts


def build_datasets_for(cfg: TrainConfig) -> dict:
    """``{"train", "val", "test"}`` for the config, validated before any model is built."""
    return build_datasets(data_options(cfg))


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
