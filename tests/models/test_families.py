"""Every family over a paged cache equals transformers on tiny random checkpoints."""

import math

import pytest
import torch
from tiny_model import make_tiny_model
from transformers import AutoModelForCausalLM

from parley.config import ModelConfig
from parley.models.attention import AttentionMetadata, PrefillChunk, kv_cache_shape
from parley.models.llama import LlamaForCausalLM
from parley.models.loader import load_model

BLOCK = 4
NUM_BLOCKS = 16
PROMPT = [1, 50, 60, 70, 80, 90, 100, 110, 120, 3, 4]

# name -> (family, tied embeddings, config overrides). Windows of 8 tokens: the tests' 11-19 token
# sequences run past them, so the sliding layers' masks count.
VARIANTS = {
    "llama-tied": ("llama", True, {}),
    "llama-untied": ("llama", False, {}),
    "qwen2-tied": ("qwen2", True, {}),
    "qwen2-untied": ("qwen2", False, {}),
    "llama-rope-linear": ("llama", True, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-rope-llama3": (
        "llama",
        False,
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral-window": ("mistral", False, {"sliding_window": 8}),
    "qwen2-window": ("qwen2", False, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("qwen3", False, {}),
    "qwen3-tied-bias": ("qwen3", True, {"attention_bias": True}),
    "olmo2": ("olmo2", False, {}),
    "granite": ("granite", True, {"attention_bias": True}),
    "phi3": ("phi3", False, {}),
    "phi3-longrope": ("phi3", False, {"original_max_position_embeddings": 64, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0, 1.5, 2.5, 4.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}}),
    "gemma2": ("gemma2", True, {}),
    "gemma3": ("gemma3", True, {}),
    "mixtral": ("mixtral", False, {}),
    "mixtral-window": ("mixtral", True, {"sliding_window": 8}),
    "qwen3-moe": ("qwen3_moe", False, {}),
    "qwen3-moe-dense-layer": ("qwen3_moe", True, {"norm_topk_prob": False, "decoder_sparse_step": 2}),
    "olmoe": ("olmoe", False, {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    arch, tie, overrides = VARIANTS[request.param]
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, tie=tie, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ours, _ = load_model(path, torch.float32, "cpu")
    return ours, hf


def make_caches(config, dtype=torch.float32):
    # Random, not zeros: stale values in slots a sequence may not see must not leak into its output.
    shape = kv_cache_shape(NUM_BLOCKS, BLOCK, config.num_kv_heads, config.head_dim)
    return [
        (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) for _ in range(config.num_layers)
    ]


def slots(table: list[int], positions: range) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def step(model, caches, decodes=(), prefills=()):
    """One forward of a flat batch; returns hidden states [N, hidden].

    decodes: (token, position, block_table) per sequence; prefills: (tokens, start_position, block_table).
    """
    ids, positions, slot_mapping = [], [], []
    for token, pos, table in decodes:
        ids.append(token)
        positions.append(pos)
        slot_mapping += slots(table, range(pos, pos + 1))
    chunks = []
    for tokens, start, table in prefills:
        context = start + len(tokens)
        chunks.append(
            PrefillChunk(len(ids), len(tokens), context, torch.tensor(table[: math.ceil(context / BLOCK)]))
        )
        ids += tokens
        positions += range(start, context)
        slot_mapping += slots(table, range(start, context))
    decode_tables = decode_bias = context_lens = None
    if decodes:
        context_lens = torch.tensor([pos + 1 for _, pos, _ in decodes])
        width = max(len(table) for _, _, table in decodes)
        decode_tables = torch.tensor([table + [0] * (width - len(table)) for _, _, table in decodes])
        visible = (
            torch.arange(width * BLOCK)[None, :] <= torch.tensor([pos for _, pos, _ in decodes])[:, None]
        )
        decode_bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, :]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping),
        num_decode_tokens=len(decodes),
        decode_block_tables=decode_tables,
        decode_bias=decode_bias,
        decode_context_lens=context_lens,
        prefill_chunks=tuple(chunks),
    )
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.tensor(positions), caches, meta)


def hf_logits(hf, tokens):
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0]


def test_prefill_matches_transformers(models):
    ours, hf = models
    caches = make_caches(ours.config)
    hidden = step(ours, caches, prefills=[(PROMPT, 0, [5, 2, 7])])
    torch.testing.assert_close(ours.compute_logits(hidden), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_chunked_prefill_then_decode_matches_transformers(models):
    ours, hf = models
    continuation = [200, 13, 7, 300, 250, 8, 99, 150]
    expected = hf_logits(hf, PROMPT + continuation)
    table = [9, 3, 14, 0, 6]  # 20 slots for 19 tokens, out of order
    caches = make_caches(ours.config)
    first = step(ours, caches, prefills=[(PROMPT[:6], 0, table)])
    second = step(ours, caches, prefills=[(PROMPT[6:], 6, table)])
    prompt_logits = ours.compute_logits(torch.cat([first, second]))
    torch.testing.assert_close(prompt_logits, expected[: len(PROMPT)], atol=1e-4, rtol=0)

    tokens = PROMPT[:]
    for token in continuation:
        pos = len(tokens)
        tokens.append(token)
        logits = ours.compute_logits(step(ours, caches, decodes=[(token, pos, table)]))
        torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=0)


def test_mixed_batch_equals_each_alone(models):
    ours, _ = models
    a, b, c = [5, 1, 8, 2], [11, 4, 6], [13, 10, 12, 7]  # block tables of different widths
    seq_a, seq_b, seq_c = PROMPT[:5] + [42], PROMPT + [43], PROMPT[:3] + [44, 45, 46, 47, 48, 49, 50]
    caches = make_caches(ours.config)
    step(ours, caches, prefills=[(seq_a[:5], 0, a), (seq_b[:-1], 0, b), (seq_c[:3], 0, c)])

    decodes = [(seq_a[5], 5, a), (seq_b[-1], len(PROMPT), b)]
    chunk = (seq_c[3:], 3, c)
    alone = [step(ours, [(k.clone(), v.clone()) for k, v in caches], decodes=[d]) for d in decodes]
    alone.append(step(ours, [(k.clone(), v.clone()) for k, v in caches], prefills=[chunk]))
    mixed = step(ours, caches, decodes=decodes, prefills=[chunk])
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)


def _hf_named(hf):
    """The reference's tensors by HF name (ours are packed for oneDNN once loaded)."""
    tied = hf.config.tie_word_embeddings
    return [(name, t.clone()) for name, t in hf.state_dict().items() if not (tied and name == "lm_head.weight")]


def test_bfloat16_is_close_to_float32(models, tmp_path):
    ours, hf = models
    bf16 = type(ours)(ours.config).to(torch.bfloat16)
    bf16.load_weights(_hf_named(hf))
    caches = make_caches(ours.config)
    reference = ours.compute_logits(step(ours, caches, prefills=[(PROMPT, 0, [5, 2, 7])]))
    logits = bf16.compute_logits(
        step(bf16, make_caches(ours.config, torch.bfloat16), prefills=[(PROMPT, 0, [5, 2, 7])])
    )
    assert logits.dtype == torch.float32
    error = (logits - reference).abs().max()
    if ours.config.num_experts:  # bf16 rounding moves tokens whose top experts nearly tie: as far as HF's own bf16
        hf.save_pretrained(tmp_path)
        hf_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
        assert error <= 1.5 * (hf_logits(hf_bf16, PROMPT).float() - reference).abs().max() + 0.01
    else:
        assert error < 0.1 * reference.abs().max()


def test_load_weights_names_unknown_and_missing_tensors(models):
    ours, hf = models
    weights = _hf_named(hf)
    model = type(ours)(ours.config)
    with pytest.raises(ValueError, match=r"unknown tensor 'model\.layers\.0\.self_attn\.qkv\.weight'"):
        model.load_weights(weights + [("model.layers.0.self_attn.qkv.weight", torch.zeros(1))])
    last = max(name for name, _ in weights if name.startswith("model.layers.1."))
    with pytest.raises(ValueError, match=rf"missing tensor\(s\) {last.replace('.', '[.]')}$"):
        model.load_weights([(n, t) for n, t in weights if n != last])
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        model.load_weights([(n, torch.zeros(3) if n == "model.norm.weight" else t) for n, t in weights])


def test_unsupported_rope_scaling_is_a_clear_error():
    config = ModelConfig(
        "LlamaForCausalLM", 10, 8, 16, 1, 2, 1, 4, rope_scaling={"type": "yarn", "factor": 4.0}
    )
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        LlamaForCausalLM(config)


REFUSED = [
    ("llama", "mlp_bias", True, r"mlp_bias=True is not supported"),
    ("llama", "hidden_act", "relu", r"hidden_act='relu' is not supported"),
    ("llama", "quantization_config", {"quant_method": "awq"}, r"quantization_config \(awq\) is not supported"),
    ("granite", "mlp_bias", True, r"mlp_bias=True is not supported"),
    ("gemma3", "use_bidirectional_attention", True, r"use_bidirectional_attention=True is not supported"),
    ("qwen3", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"unsupported rope_scaling type 'yarn'"),
    ("phi3", "rope_scaling", {"type": "dynamic", "factor": 2.0}, r"unsupported rope_scaling type 'dynamic'"),
    ("llama", "architectures", ["Qwen2MoeForCausalLM"], r"unsupported architecture 'Qwen2MoeForCausalLM'"),
]


@pytest.mark.parametrize("arch,field,value,message", REFUSED, ids=[f"{a}-{f}" for a, f, _, _ in REFUSED])
def test_a_config_field_that_is_not_served_is_refused_at_load_naming_it(tmp_path, arch, field, value, message):
    import json
    import pathlib

    from parley.models.loader import ModelLoadError

    folder = pathlib.Path(make_tiny_model(tmp_path, arch))
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder), torch.float32, "cpu")


def test_a_field_the_config_json_omits_takes_the_family_default(tmp_path):
    """Gemma 2's class defaults attn_logit_softcapping to 50 and ties the embeddings: a config.json
    without them means that to transformers, and so to us."""
    import json
    import pathlib

    folder = pathlib.Path(make_tiny_model(tmp_path, "gemma2", tie=True, attn_logit_softcapping=50.0))
    config = json.loads((folder / "config.json").read_text())
    config.pop("attn_logit_softcapping")
    config.pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(config))
    ours, parsed = load_model(str(folder), torch.float32, "cpu")
    assert (parsed.attn_logit_softcap, parsed.tie_word_embeddings) == (50.0, True)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    hidden = step(ours, make_caches(parsed), prefills=[(PROMPT, 0, [5, 2, 7])])
    torch.testing.assert_close(ours.compute_logits(hidden), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_longrope_serves_the_original_context_only(tmp_path):
    _, config = load_model(make_tiny_model(tmp_path, "phi3", **VARIANTS["phi3-longrope"][2]), torch.float32, "cpu")
    assert config.max_position_embeddings == 64


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_experts_run_batched_one_matmul_pair_per_chosen_expert(tmp_path, arch, monkeypatch):
    from parley.models.layers import moe

    ours, config = load_model(make_tiny_model(tmp_path, arch), torch.float32, "cpu")
    calls = []
    plain = moe.linear
    monkeypatch.setattr(moe, "linear", lambda x, w, *a: calls.append(x.shape[0]) or plain(x, w, *a))
    tokens = PROMPT * 3  # 33 tokens, each choosing num_experts_per_tok of the 4 experts
    layer = ours.layers[-1]
    x = torch.randn(len(tokens), config.hidden_size)
    out = layer._mlp(x, None)
    router, experts = calls[0], calls[1:]
    assert router == len(tokens) and len(experts) <= 2 * config.num_experts
    assert sum(experts[::2]) == len(tokens) * config.num_experts_per_tok  # each (token, expert) pair once
    # the same rows alone: the same output (a row's result does not depend on the batch)
    torch.testing.assert_close(layer._mlp(x[5:6], None), out[5:6], atol=1e-6, rtol=0)
