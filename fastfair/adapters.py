"""LoRA adapters on disk in HF PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``).

Files written here load with ``peft.PeftModel.from_pretrained`` and files written by peft load here:
keys are ``base_model.model.<module>.lora_A.weight`` (r×in) and ``...lora_B.weight`` (out×r); the
trainable non-LoRA modules (the head) are saved as ``modules_to_save`` under their own names.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .inject import lora_layers, name_matches, pattern_value
from .lora import LoRALinear

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory, adapter_name: str = "default",
                 modules_to_save=None) -> Path:
    """Write one adapter of ``model`` (and the modules in ``modules_to_save``) in PEFT format.

    ``modules_to_save`` defaults to the modules outside LoRA that have trainable parameters and
    no trainable child (typically the classifier head).
    """
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapters}
    if not layers:
        raise ValueError(f"model has no LoRA layer with adapter {adapter_name!r}")
    tensors, ranks, alphas = {}, {}, {}
    configs = {n: m.adapters[adapter_name] for n, m in layers.items()}
    for name, layer in layers.items():
        if adapter_name in layer.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {name}; unmerge() first")
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().contiguous()
        ranks[name], alphas[name] = configs[name].r, configs[name].alpha
    if modules_to_save is None:
        modules_to_save = _trainable_non_lora_modules(model)
    for mod_name in modules_to_save:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[f"{PREFIX}{mod_name}.{pname}"] = p.detach().contiguous()

    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {c.dropout for c in configs.values()}
    rslora = {c.use_rslora for c in configs.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes dropout {dropouts} or rslora {rslora} "
                         "across layers, which the PEFT format cannot express")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # Suffixes are what peft users write, but peft would also wrap any other module they match
    # (timm's patch_embed.proj is a Conv2d named like attn.proj), so use them only when exact.
    names = [n for n, _ in model.named_modules() if not n.endswith(".base") and ".lora_" not in n]
    exact = {n for n in names if n and name_matches(n, suffixes)} == set(layers)
    config = {
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
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, directory, name: str = "default", trainable: bool = False,
                 load_modules_to_save: bool = True, backend: str = "auto") -> list[str]:
    """Load a PEFT-format LoRA adapter into ``model`` as adapter ``name``; return the layers.

    Plain linear layers are wrapped in ``LoRALinear``; layers that already are get one more
    adapter, so a frozen upstream adapter (``trainable=False``) can sit beside a task adapter.
    """
    d = Path(directory)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            raise ValueError(f"{d / f} not found: not a PEFT adapter directory")
    config = json.loads((d / CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d / CONFIG_NAME}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"{d / CONFIG_NAME}: {flag}=true is not supported by fastfair")
    tensors = load_file(str(d / WEIGHTS_NAME))
    pairs, others = {}, {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in k:
                module_name, rest = k.split(marker, 1)
                # peft writes 'lora_A.weight'; older files may keep the adapter name in the key
                pairs.setdefault(module_name, {})[part] = t
                break
        else:
            others[k] = t
    modules = dict(model.named_modules())
    loaded = []
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{d / WEIGHTS_NAME}: {module_name} has {sorted(ab)} but needs lora_A and lora_B")
        module = modules.get(module_name)
        if module is None or not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"{d / WEIGHTS_NAME}: key for module {module_name!r} matches no linear "
                             f"layer of the model (found {type(module).__name__ if module else None})")
        A, B = ab["lora_A"], ab["lora_B"]
        r = A.shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, module_name, config["lora_alpha"])
        if isinstance(module, LoRALinear):
            layer = module
            if name in layer.adapters:
                raise ValueError(f"{module_name} already has an adapter named {name!r}")
            layer.add_adapter(name, r, alpha, config.get("lora_dropout", 0.0),
                              use_rslora=config.get("use_rslora", False))
        else:
            layer = LoRALinear(module, r, alpha, config.get("lora_dropout", 0.0),
                               config.get("use_rslora", False), backend, adapter_name=name)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        for part, t, param in (("lora_A", A, layer.lora_A[name]), ("lora_B", B, layer.lora_B[name])):
            if t.shape != param.shape:
                raise ValueError(f"{d / WEIGHTS_NAME}: {module_name}.{part} has shape {tuple(t.shape)}, "
                                 f"the layer needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(t)
        layer.set_trainable(name, trainable)
        loaded.append(module_name)
    if load_modules_to_save and others:
        state = model.state_dict()
        for k, t in others.items():
            k_model = k.replace(".modules_to_save.default.", ".")
            if k_model not in state:
                raise ValueError(f"{d / WEIGHTS_NAME}: {k!r} matches no parameter of the model")
            if state[k_model].shape != t.shape:
                raise ValueError(f"{d / WEIGHTS_NAME}: {k!r} has shape {tuple(t.shape)}, the model's "
                                 f"{k_model} has {tuple(state[k_model].shape)}; pass "
                                 "load_modules_to_save=False to keep the model's own")
            with torch.no_grad():
                _param(model, k_model).copy_(t)
    return loaded


def _trainable_non_lora_modules(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or ".lora_" in name:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    # the PEFT format keeps whole modules beside the adapter: not the root's own parameters,
    # and not a LoRA layer's frozen base (peft would not find it under that name)
    root = [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]
    bases = [n for n in names if n.endswith(".base") and isinstance(model.get_submodule(n[:-5]), LoRALinear)]
    if root or bases:
        raise ValueError(f"trainable parameters the PEFT format cannot save beside the adapter: "
                         f"{root + bases}; freeze them or pass modules_to_save explicitly")
    # keep the outermost module of each trainable subtree
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _param(model: nn.Module, dotted: str) -> torch.Tensor:
    mod_name, _, pname = dotted.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, pname)
