"""A grammar too costly to compile is refused within a bound of time and memory, and none can crash
the process: grammars are compiled in a sandboxed worker first (a deadline, an address-space cap),
then here on a deep stack. The bounds are small here so the tests stay quick."""

import json

import pytest

from parley.structured import GrammarCompiler, GrammarError
from parley.structured.sandbox import GrammarSandbox
from parley.structured.llg_vocabulary import byte_level_decoder_json
from parley.types import Grammar

# The emptiness check of an intersection of unanchored patterns grows exponentially with their
# number: 20 took 30 s, 24 more than 100 s. A schema of 800 bytes.
EXPONENTIAL = {"type": "string", "allOf": [{"pattern": f"[a-z]*{chr(97 + i % 26)}{i}"} for i in range(30)]}
# 10,000 required properties with patterns: 0.6 MB of schema, about 60 MB to compile.
LARGE = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 50 + 1}}}$"}
                                          for i in range(10000)}, "required": [f"p{i}" for i in range(10000)]}


def ref_chain(n: int) -> dict:
    """Arrays of arrays, n deep, each level its own $defs entry: llguidance compiles the chain
    recursively, and 5,000 links overflowed an 8 MB stack (a segfault)."""
    defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}, "maxItems": 1} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "integer"}}, "$ref": "#/$defs/d0"}


@pytest.fixture(scope="module")
def tight(backend_tokenizer, eos_ids):
    """A compiler whose sandbox allows 2 s and 20 MB."""
    sandbox = GrammarSandbox(byte_level_decoder_json(backend_tokenizer), backend_tokenizer.get_vocab_size(), eos_ids,
                             timeout_s=2, memory_bytes=20 << 20)
    compiler = GrammarCompiler(backend_tokenizer, eos_ids, backend_tokenizer.get_vocab_size(), sandbox=sandbox)
    yield compiler
    compiler.close()


@pytest.mark.parametrize("schema, bound", [(EXPONENTIAL, "2 s"), (LARGE, "20 MB")], ids=["time", "memory"])
def test_a_grammar_past_the_bounds_is_refused(tight, schema, bound):
    with pytest.raises(GrammarError, match=f"too costly to compile .*{bound}"):
        tight.validate(Grammar("json", json.dumps(schema)))
    tight.validate(Grammar("json", json.dumps({"type": "integer"})))  # the worker was replaced


def test_a_deep_schema_compiles_without_crashing(compiler, backend_tokenizer):
    matcher = compiler.matcher(Grammar("json", json.dumps(ref_chain(5000))))
    for token in backend_tokenizer.encode("[[[[]]]]", add_special_tokens=False).ids:
        assert matcher.accept(token), matcher.error
    assert matcher.is_terminated()


def test_errors_still_name_what_is_wrong(tight):
    with pytest.raises(GrammarError, match="uniqueItems"):
        tight.validate(Grammar("json", json.dumps({"type": "array", "uniqueItems": True})))
