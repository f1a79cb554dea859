"""One LoRA adapter, read from a PEFT folder and checked against the base model.

PEFT saves `adapter_config.json` and, per adapted linear layer, `lora_A` [r, in] and `lora_B`
[out, r] in `adapter_model.safetensors`; the layer computes W x + scale * B A x with scale =
lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). The scale is folded into B here, once, and each
module's A's and B's are stacked over the layers. Pickled weights (adapter_model.bin) are never read.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from parley.config import ModelConfig
from parley.types import ValidationError

log = logging.getLogger("parley.adapters")

# the model's fused projection -> the PEFT module names it holds, in the order of its output rows
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
SUPPORTED_MODULES = tuple(m for modules in PROJECTIONS.values() for m in modules)
_LEAVES = ("weight", "bias", "base_layer")  # tensor-name parts after the module's name
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<path>model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+))"
                  r"\.lora_(?P<ab>[AB])\.weight")


class AdapterError(ValidationError):
    """An adapter cannot be loaded or named as asked (422)."""

    def __init__(self, message: str, field: str = "lora_path"):
        super().__init__(message, field)


@dataclass(frozen=True)
class ModuleWeights:
    """One adapter's LoRA on one linear layer kind (q_proj, ...), every layer; zeros where a layer has none."""

    a: torch.Tensor  # [num_layers, r, in]
    b: torch.Tensor  # [num_layers, out, r], scale folded in


@dataclass(frozen=True)
class LoRAWeights:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    modules: dict[str, ModuleWeights]  # only the modules it targets
    base_model: str | None = None  # adapter_config's base_model_name_or_path


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of the base model's linear layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def load_lora(name: str, path: str, model: ModelConfig, *, max_rank: int, dtype: torch.dtype,
              device: torch.device | str = "cpu", served_model: str | None = None) -> LoRAWeights:
    """Read and check a PEFT LoRA folder; AdapterError says what is wrong with it."""
    folder = pathlib.Path(path)
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    base = config.get("base_model_name_or_path")
    if base and served_model and base != served_model:
        log.warning("adapter %r was trained on %r; serving it on %r (shapes fit)", name, base, served_model)
    pairs = _pairs(tensors, model, max_rank, _scaling(config))
    modules = {module: _stack_layers(module, pairs, model, dtype, device)
               for module in SUPPORTED_MODULES if any(m == module for m, _ in pairs)}
    return LoRAWeights(name, str(folder), max(a.shape[0] for a, _ in pairs.values()), modules, base)


def _scaling(config: dict):
    """(module path, rank) -> PEFT's scale: lora_alpha / r, or / sqrt(r) with use_rslora; alpha_pattern
    overrides lora_alpha for the modules its keys match (PEFT's rule: a key matching the path's end)."""
    alpha, rslora = config.get("lora_alpha", config["r"]), bool(config.get("use_rslora"))
    patterns = config.get("alpha_pattern") or {}

    def scale(path: str, rank: int) -> float:
        a = next((v for k, v in patterns.items() if re.fullmatch(rf"(.*\.)?({k})", path)), alpha)
        return a / math.sqrt(rank) if rslora else a / rank

    return scale


def _read_config(folder: pathlib.Path) -> dict:
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter path {str(folder)!r} is not a folder")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"LoRA adapter folder {str(folder)!r} has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter type {config['peft_type']!r} is not supported; Parley serves LoRA adapters")
    if "r" not in config:
        raise AdapterError(f"{folder / CONFIG_FILE} has no rank `r`")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unsupported = sorted(set(targets) - set(SUPPORTED_MODULES))
        if unsupported:
            raise AdapterError(f"unsupported target module(s) {', '.join(unsupported)}: Parley applies LoRA to "
                               f"{', '.join(SUPPORTED_MODULES)} only")
    for flag, what in (("use_dora", "DoRA (use_dora)"), ("modules_to_save", "modules_to_save"),
                       ("lora_bias", "LoRA biases (lora_bias)")):
        if config.get(flag):
            raise AdapterError(f"{what} is not supported")
    return config


def _read_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterError(f"{str(folder)!r} holds only adapter_model.bin, a pickle, which Parley never loads: "
                               f"save the adapter as safetensors (save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"LoRA adapter folder {str(folder)!r} has no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"cannot read {weights}: {exc}") from None


def _pairs(tensors: dict[str, torch.Tensor], model: ModelConfig, max_rank: int,
           scale) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(module, layer) -> (A [r, in], scale * B [out, r]) in float32, every shape checked against the
    base model."""
    found: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}  # (module, layer, path) -> {"A": .., "B": ..}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match["module"] not in SUPPORTED_MODULES:
            module = [p for p in key.split(".") if p not in _LEAVES and not p.startswith("lora_")][-1]
            raise AdapterError(f"unsupported target module {module!r} (tensor {key!r}): Parley applies LoRA to "
                               f"{', '.join(SUPPORTED_MODULES)} only")
        found.setdefault((match["module"], int(match["layer"]), match["path"]), {})[match["ab"]] = tensor
    if not found:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    shapes, pairs = module_shapes(model), {}
    for (module, layer, path), ab in sorted(found.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        in_features, out_features = shapes[module]
        if layer >= model.num_layers:
            raise AdapterError(f"adapter does not fit the base model: it adapts {where}, the model has "
                               f"{model.num_layers} layers")
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"adapter does not fit the base model: {where} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, the model expects ({rank}, {in_features}) and ({out_features}, {rank})")
        if rank > max_rank:
            raise AdapterError(f"adapter rank {rank} ({where}) exceeds the maximum LoRA rank {max_rank} "
                               "(--max-lora-rank)")
        pairs[(module, layer)] = (a.float(), b.float() * scale(path, rank))
    return pairs


def _stack_layers(module: str, pairs, model: ModelConfig, dtype, device) -> ModuleWeights:
    """One module's A's [L, r, in] and B's [L, out, r] over the layers; r is its largest rank, the
    layers with a smaller one (PEFT's rank_pattern) or none are padded with zeros."""
    layers = {layer: pair for (m, layer), pair in pairs.items() if m == module}
    rank = max(a.shape[0] for a, _ in layers.values())
    in_features, out_features = module_shapes(model)[module]
    a = torch.zeros(model.num_layers, rank, in_features)
    b = torch.zeros(model.num_layers, out_features, rank)
    for layer, (layer_a, layer_b) in layers.items():
        a[layer, : layer_a.shape[0]] = layer_a
        b[layer, :, : layer_b.shape[1]] = layer_b
    return ModuleWeights(a.to(device, dtype), b.to(device, dtype))
