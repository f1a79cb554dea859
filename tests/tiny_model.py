"""A tiny random checkpoint of each family with a real tokenizer, written as an HF folder, for tests."""

from __future__ import annotations

import json
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

# SmolLM2-135M-Instruct's template (GGUF key tokenizer.chat_template of the default model).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# A thinking model's template, as DeepSeek-R1's and Qwen3's behave: the generation prompt opens the
# thinking; `enable_thinking: false` closes an empty one (Qwen3); `free_thinking: true` leaves it
# to the model to open one with its first token (Qwen3's default).
THINKING_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' and message.get('reasoning_content') and loop.last %}"
    "{{ '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% elif not free_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
THINK_TOKENS = ["<think>", "</think>"]  # added, not special, as in Qwen3's and DeepSeek-R1's tokenizers
# Qwen2.5-Coder's fill-in-the-middle markers and two of the tokens that end a middle (special, as there)
INFILL_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that answered every question.",
    "The weather is sunny and warm, with a light breeze from the west.",
    "Please write a short poem about the sea and the stars.",
    "What is the capital of France? The capital of France is Paris.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e9 65536",
    "Call 555-0199 before 10:30 on 2024-06-01 to order 12 items at $3.50 each.",
    '{"name": "Parley", "version": 1, "tags": ["fast", "small"], "ok": true}',
    "Unicode: café, naïve, über, señor, façade, Ünïcödé, こんにちは, 你好, Привет, 🙂🚀",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The user asked a question and the assistant gave a helpful answer.",
]


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


# Each family's config class and what makes its tiny model exercise the family's own math: small
# heads (the classes' defaults are 128-256 wide), few experts, multipliers and caps far from 1.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 6.0, "residual_multiplier": 0.3,
                                  "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
                                "final_logit_softcapping": 5.0, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"], "rope_local_base_freq": 100.0,
                                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 48, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 0.3}),
}


def _hf_config(arch: str, vocab_size: int, tie: bool, overrides: dict):
    import transformers

    name, family = FAMILIES[arch]
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": SPECIAL_TOKENS.index("<|im_start|>"),
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    }
    kwargs.update(family)
    kwargs.update(overrides)
    return getattr(transformers, name)(**kwargs)


def make_tiny_model(
    path, arch: str = "llama", *, tie: bool = True, seed: int = 0, vocab_size: int | None = None,
    thinking: bool = False, chat_template: str | None = None, special_tokens: tuple[str, ...] = (),
    added_tokens: tuple[str, ...] = (), **overrides
) -> str:
    """Write a random `arch` (a key of FAMILIES) checkpoint + tokenizer to folder `path`; return it.

    The model's vocab equals the tokenizer's (~400 tokens) unless `vocab_size` pads it larger, as
    real checkpoints often do. `overrides` go to the HF config (e.g. rope_scaling). Every weight,
    norms and biases included, is random so that a wrongly loaded tensor changes the logits.
    `thinking`: a model that thinks, with THINK_TOKENS and THINKING_TEMPLATE. `chat_template`: a
    family's own template instead, with the `special_tokens` and (not special) `added_tokens` it writes.
    """
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(400)
    if thinking:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    n_tokens = tokenizer.get_vocab_size()
    if vocab_size is not None and vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
    config = _hf_config(arch, vocab_size or n_tokens, tie, overrides)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    model.save_pretrained(path, safe_serialization=True)

    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": chat_template or (THINKING_TEMPLATE if thinking else CHAT_TEMPLATE),
        "model_max_length": config.max_position_embeddings,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return str(path)


def start_tiny_engine(model_dir: str, **overrides):
    """A started float32 engine on a tiny model, with small limits; overrides go to EngineConfig."""
    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine

    config = dict(model_id=model_dir, dtype="float32", num_threads=1, max_total_tokens=256,
                  max_batch_total_tokens=4096, max_batch_prefill_tokens=64)
    config.update(overrides)
    engine = AsyncEngine.load(EngineConfig(**config))
    engine.start()
    return engine
