"""LoRA adapters on disk in HF PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``).

Files written here load with ``peft.PeftModel.from_pretrained`` and files written by peft load here:
keys are ``base_model.model.<module>.lora_A.weight`` (r×in, or r×in×kh×kw for a convolution) and
``...lora_B.weight`` (out×r, or out×r×1×1); the trainable non-LoRA modules (the head) are saved
whole, parameters and buffers, as ``modules_to_save`` under their own names.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch.nn as nn
from safetensors.torch import load_file, save_file

from .backend import check_backend
from .inject import internal_names, lora_layers, model_edit, name_matches, pattern_value, wrapper_for
from .lora import LoRALayer, check_adapter_args, check_adapter_name
from .lora_conv import LoRAConv2d

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory, adapter_name: str | Sequence[str] = "default",
                 modules_to_save=None) -> Path:
    """Write adapter(s) of ``model`` (and the modules in ``modules_to_save``) in PEFT format.

    ``modules_to_save`` defaults to the modules outside LoRA that have trainable parameters and
    no trainable child (typically the classifier head); they are saved whole, parameters and
    buffers (a BatchNorm's running statistics), as peft does. A list of adapter names is written
    in peft's ``save_pretrained`` layout (``default`` in ``directory``, any other in
    ``directory/<name>``), with the modules saved once, beside the first adapter, so peft loads
    them all (``PeftModel.from_pretrained`` then ``load_adapter``).
    """
    if isinstance(adapter_name, str):
        return _save_one(model, Path(directory), adapter_name, modules_to_save)
    names = list(adapter_name)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"adapter_name must name distinct adapters, got {adapter_name!r}")
    mods = _trainable_non_lora_modules(model) if modules_to_save is None else list(modules_to_save)
    for name in names:  # check every adapter before writing any
        _adapter_tensors(model, name)
    for i, name in enumerate(names):
        out = Path(directory) if name == "default" else Path(directory) / name
        _save_one(model, out, name, mods if i == 0 else [])
    return Path(directory)


def _adapter_tensors(model: nn.Module, adapter_name: str):
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapters}
    if not layers:
        raise ValueError(f"model has no LoRA layer with adapter {adapter_name!r}")
    tensors = {}
    for name, layer in layers.items():
        if adapter_name in layer.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {name}; unmerge() first")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().contiguous()
    return layers, tensors


def _save_one(model: nn.Module, out: Path, adapter_name: str, modules_to_save) -> Path:
    layers, tensors = _adapter_tensors(model, adapter_name)
    configs = {n: m.adapters[adapter_name] for n, m in layers.items()}
    if modules_to_save is None:
        modules_to_save = _trainable_non_lora_modules(model)
    for mod_name in modules_to_save:
        for key, t in model.get_submodule(mod_name).state_dict().items():
            tensors[f"{PREFIX}{mod_name}.{key}"] = t.detach().contiguous()
    config = _peft_config(model, layers, configs, adapter_name, modules_to_save)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _peft_config(model, layers, configs, adapter_name, modules_to_save) -> dict:
    ranks = {n: c.r for n, c in configs.items()}
    alphas = {n: c.alpha for n, c in configs.items()}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {c.dropout for c in configs.values()}
    rslora = {c.use_rslora for c in configs.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes dropout {dropouts} or rslora {rslora} "
                         "across layers, which the PEFT format cannot express")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # Suffixes are what peft users write, but peft wraps every module they match, so use them
    # only when they match exactly the adapted layers.
    inside = internal_names(model)
    names = [n for n, _ in model.named_modules() if n and n not in inside]
    exact = {n for n in names if name_matches(n, suffixes)} == set(layers)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": suffixes if exact else sorted(layers),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "modules_to_save": list(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def load_adapter(model: nn.Module, directory, name: str = "default", trainable: bool = False,
                 load_modules_to_save: bool = True, backend: str = "auto") -> list[str]:
    """Load a PEFT-format LoRA adapter into ``model`` as adapter ``name``; return the layers.

    Plain linear and Conv2d layers are wrapped in LoRA; layers that already are get one more
    adapter, so a frozen upstream adapter (``trainable=False``) can sit beside a task adapter. A
    layer that already has an adapter ``name`` of the same shapes gets the file's weights and
    settings instead, as in peft. Everything is checked before the model changes: on error the
    model is as it was.
    """
    d = Path(directory)
    config, pairs, others = _read_adapter(d)
    check_adapter_name(name)
    check_backend(backend)
    inside = internal_names(model)
    modules = {n: m for n, m in model.named_modules() if n not in inside}
    plan = [_plan_layer(modules, d, module_name, ab, config, name) for module_name, ab in sorted(pairs.items())]
    extra = _plan_modules_to_save(model, d, others) if load_modules_to_save else []
    dropout, rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    with model_edit(model) as edit:
        for module_name, module, A, B, alpha in plan:
            layer = module
            if not isinstance(module, LoRALayer):
                layer = wrapper_for(module)(module, A.shape[0], alpha, dropout, rslora, backend, adapter_name=name)
                edit.replace(module_name, layer)
            elif name in module.adapters:
                edit.set_config(layer, name, alpha=alpha, dropout=dropout, use_rslora=rslora)
            else:
                edit.add_adapter(layer, name, A.shape[0], alpha, dropout, use_rslora=rslora)
            edit.copy_(layer.lora_A[name], A)
            edit.copy_(layer.lora_B[name], B)
            layer.set_trainable(name, trainable)
        for target, t in extra:
            edit.copy_(target, t)
    return [p[0] for p in plan]


def _read_adapter(d: Path):
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            raise ValueError(f"{d / f} not found: not a PEFT adapter directory")
    config = json.loads((d / CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d / CONFIG_NAME}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"{d / CONFIG_NAME}: {flag}=true is not supported by fastfair")
    pairs, others = {}, {}
    for key, t in load_file(str(d / WEIGHTS_NAME)).items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in k:
                # peft writes 'lora_A.weight'; older files may keep the adapter name in the key
                pairs.setdefault(k.split(marker, 1)[0], {})[part] = t
                break
        else:
            others[k.replace(".modules_to_save.default.", ".")] = t
    return config, pairs, others


def _plan_layer(modules, d, module_name, ab, config, name):
    """One layer to load into, with its tensors and alpha; every check an error could fail."""
    where = d / WEIGHTS_NAME
    if set(ab) != {"lora_A", "lora_B"}:
        raise ValueError(f"{where}: {module_name} has {sorted(ab)} but needs lora_A and lora_B")
    module = modules.get(module_name)
    cls = None if module is None else wrapper_for(module)
    if cls is None:
        raise ValueError(f"{where}: key for module {module_name!r} matches no Linear or Conv2d layer of "
                         f"the model (found {type(module).__name__ if module is not None else None})")
    A, B = ab["lora_A"], ab["lora_B"]
    r = A.shape[0] if A.dim() else 0
    alpha = pattern_value(config.get("alpha_pattern") or {}, module_name, config["lora_alpha"])
    try:
        check_adapter_args(r, alpha, config.get("lora_dropout", 0.0))
        if cls is LoRAConv2d:
            LoRAConv2d.check_base(module)
    except ValueError as e:
        raise ValueError(f"{where}: {module_name}: {e}") from None
    if isinstance(module, LoRALayer) and name in module.adapters:  # replaced in place: same shapes
        shapes = (module.lora_A[name].shape, module.lora_B[name].shape)
    else:
        shapes = cls.adapter_shapes(module.base if isinstance(module, LoRALayer) else module, r)
    for part, t, want in zip(("lora_A", "lora_B"), (A, B), shapes):
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{where}: {module_name}.{part} has shape {tuple(t.shape)}, "
                             f"the layer needs {tuple(want)}")
    return module_name, module, A, B, alpha


def _plan_modules_to_save(model, d, others):
    state = model.state_dict(keep_vars=True)
    plan = []
    for k, t in others.items():
        if k not in state:
            raise ValueError(f"{d / WEIGHTS_NAME}: {k!r} matches no parameter or buffer of the model")
        if state[k].shape != t.shape:
            raise ValueError(f"{d / WEIGHTS_NAME}: {k!r} has shape {tuple(t.shape)}, the model's "
                             f"has {tuple(state[k].shape)}; pass load_modules_to_save=False to keep the model's own")
        plan.append((state[k], t))
    return plan


def _trainable_non_lora_modules(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALayer) or ".lora_" in name:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    # the PEFT format keeps whole modules beside the adapter: not the root's own parameters,
    # and not a LoRA layer's frozen base (peft would not find it under that name)
    root = [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]
    bases = [n for n in names if n.endswith(".base") and isinstance(model.get_submodule(n[:-5]), LoRALayer)]
    if root or bases:
        raise ValueError(f"trainable parameters the PEFT format cannot save beside the adapter: "
                         f"{root + bases}; freeze them or pass modules_to_save explicitly")
    # keep the outermost module of each trainable subtree
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
