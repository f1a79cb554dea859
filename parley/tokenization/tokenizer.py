"""A model's tokenizer, loaded from a Hugging Face folder or from a GGUF file's metadata."""

from __future__ import annotations

import json
import os
import re

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from parley.tokenization.gguf_file import read_gguf


class Tokenizer:
    """Text <-> token ids, plus what generation needs to know about the vocabulary."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        self.eos_token_ids = eos_token_ids
        self.eos_token = backend.id_to_token(eos_token_ids[0]) if eos_token_ids else None
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self._added_text = {i: token.content for i, token in added.items()}
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        decoder = backend.decoder  # byte-level BPE spells bytes with GPT-2's printable alphabet
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token; text[start:stop] is the text the token came from
        (the whole character when a token holds only part of its UTF-8 bytes)."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        tokens = [(i, start, stop) for i, (start, stop) in zip(encoding.ids, encoding.offsets)]
        return [(self.bos_token_id, 0, 0), *tokens] if add_special_tokens and self.add_bos else tokens

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes the token adds to the output (a SentencePiece word's leading space included)."""
        if token_id in self._added_text:
            return self._added_text[token_id].encode()
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            return bytes(_BYTE_LEVEL_DECODER[char] for char in piece)
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("▁", " ").encode()


def load_tokenizer(path: str) -> Tokenizer:
    """Load from a Hugging Face model folder (tokenizer.json) or from a .gguf file."""
    if os.path.isdir(path):
        return _load_hf_folder(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _load_gguf(path)
    raise ValueError(f"{path!r} is neither a model folder nor a .gguf file")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable char standing for each byte -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    return {char: b for b, char in chars.items()}


_BYTE_LEVEL_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---- Hugging Face folder ----


def _load_hf_folder(folder: str) -> Tokenizer:
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise ValueError(f"{folder!r} has no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    tokenizer_config = _read_json(folder, "tokenizer_config.json")
    generation_config = _read_json(folder, "generation_config.json")
    model_config = _read_json(folder, "config.json")

    bos_token_id = _token_id(backend, tokenizer_config.get("bos_token"))
    if bos_token_id is None:
        bos_token_id = model_config.get("bos_token_id")
    eos_token_ids: list[int] = []
    for value in (
        _token_id(backend, tokenizer_config.get("eos_token")),
        generation_config.get("eos_token_id"),
        model_config.get("eos_token_id"),
    ):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in eos_token_ids:
                eos_token_ids.append(token_id)

    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:  # no explicit setting: whatever tokenizer.json's post-processor does
        with_specials = backend.encode("", add_special_tokens=True).ids
        add_bos = bool(with_specials) and with_specials[0] == bos_token_id
    return Tokenizer(
        backend,
        bos_token_id=bos_token_id,
        eos_token_ids=eos_token_ids,
        add_bos=add_bos,
        chat_template=_hf_chat_template(folder, tokenizer_config),
    )


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_id(backend: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    """Id of a special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _hf_chat_template(folder: str, tokenizer_config: dict) -> str | None:
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


# ---- GGUF ----

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values

# tokenizer.ggml.pre -> how text is split into words before byte-level BPE
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_GPT2 = ("default", "gpt-2", "gpt2", "phi-2")
_LLAMA3 = ("llama-bpe", "llama3", "smaug-bpe", "dbrx")
_QWEN2 = ("qwen2",)


def _load_gguf(path: str) -> Tokenizer:
    meta, _ = read_gguf(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path!r} has no tokenizer.ggml.tokens metadata")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre", "default")
        )
    elif kind == "llama":
        backend = _sentencepiece_bpe(
            tokens,
            meta["tokenizer.ggml.scores"],
            types,
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
        )
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; Parley reads 'gpt2' and 'llama'")
    # Added tokens are matched in the raw text first, so they are never split by BPE.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )

    eos_token_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id not in eos_token_ids:
            eos_token_ids.append(token_id)
    # llama.cpp's default when the file does not say: SentencePiece and Llama 3 models take a BOS.
    default_add_bos = kind == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3
    return Tokenizer(
        backend,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_token_ids,
        add_bos=meta.get("tokenizer.ggml.add_bos_token", default_add_bos),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    llama3 = pre in _LLAMA3
    backend = tokenizers.Tokenizer(
        models.BPE(
            {token: i for i, token in enumerate(tokens)},
            [tuple(merge.split(" ", 1)) for merge in merges],
            ignore_merges=llama3,
        )
    )
    gpt2_words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        backend.pre_tokenizer = gpt2_words
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), gpt2_words]
        )
    elif llama3 or pre in _QWEN2:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if llama3 else _QWEN2_SPLIT), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        if not llama3:
            backend.normalizer = normalizers.NFC()
    else:
        known = ", ".join(_GPT2 + _DIGITS_THEN_GPT2 + _LLAMA3 + _QWEN2)
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; Parley knows {known}")
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], types: list[int], *, unk_id: int | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback, as transformers' LlamaTokenizerFast (legacy=False)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            _merges_from_scores(tokens, scores, types, vocab),
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return backend


def _merges_from_scores(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece ranks pieces by score; BPE wants merges: every split of a normal piece into
    two known pieces, the best-scored pieces first (transformers' SentencePieceExtractor)."""
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
