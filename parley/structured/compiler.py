"""Grammars compiled for one tokenizer, cached so each distinct grammar is built once."""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance
import tokenizers

from parley.structured.calls import CallGuard, TokenBytes
from parley.structured.compile_worker import LIMITS, on_deep_stack
from parley.structured.matcher import GrammarMatcher
from parley.structured.numbers import number_bound_grammar
from parley.structured.sandbox import GrammarSandbox, GrammarTooCostly
from parley.structured.llg_vocabulary import build_llg_tokenizer, byte_level_decoder_json
from parley.types import CallFormat, Grammar

# JSON may have whitespace between tokens, but little at each place: with 32 characters SmolLM2
# spent most of its tokens on newlines (131 tokens for a 4-item array), and with none it cannot
# write the newline it likes before "}" and spins out digits instead. A schema's "x-guidance"
# overrides it.
_JSON_DEFAULTS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,4}"}
_LIMITS = llguidance.LLParserLimits(**LIMITS)  # the same in the sandbox's worker


class GrammarError(ValueError):
    """The grammar is malformed or uses something llguidance cannot enforce (the message names it)."""


class GrammarCompiler:
    """Turns `Grammar`s into `GrammarMatcher`s for one model's vocabulary."""

    def __init__(
        self,
        tokenizer_backend: tokenizers.Tokenizer,
        eos_token_ids: list[int],
        vocab_size: int,
        cache_size: int = 256,
        sandbox: GrammarSandbox | None = None,
    ):
        self.vocab_size = vocab_size
        self._tokenizer = build_llg_tokenizer(tokenizer_backend, eos_token_ids, vocab_size)
        self._sandbox = sandbox or GrammarSandbox(
            byte_level_decoder_json(tokenizer_backend), vocab_size, list(eos_token_ids))
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._token_bytes: TokenBytes | None = None  # built on first need
        self._number_bounds: dict[CallFormat | None, llguidance.LLMatcher] = {}

    def validate(self, grammar: Grammar) -> None:
        """Raise `GrammarError` unless `grammar` compiles (and then keep it compiled), within the
        sandbox's bounds of time and memory (see `sandbox.py`)."""
        self._compiled(grammar)

    def close(self) -> None:
        """Stop the sandbox's worker process."""
        self._sandbox.close()

    def matcher(self, grammar: Grammar, max_tokens: int | None = None) -> GrammarMatcher:
        """A fresh matcher at the start of `grammar`, for an output of at most `max_tokens`.
        Raises `GrammarError` like `validate`.

        JSON grammars and tool-call grammars (`grammar.calls`) are held to Parley's bounds too:
        numbers carry at most the digits a double holds, and tool calls neither repeat nor start
        without room (see `GrammarMatcher`). Regex and Lark grammars are followed as written."""
        compiled = self._compiled(grammar).deep_copy()
        if grammar.kind not in ("json", "json_object") and grammar.calls is None:
            return GrammarMatcher(compiled)
        token_bytes, number_bound = self._bound(grammar.calls)
        calls = None if grammar.calls is None else CallGuard(grammar.calls, token_bytes, max_tokens)
        return GrammarMatcher(compiled, token_bytes.of, number_bound.deep_copy(), calls)

    def _bound(self, calls: CallFormat | None) -> tuple[TokenBytes, llguidance.LLMatcher]:
        """Each token's bytes, and the number bound's matcher for JSON output (`calls` None) or
        for the output of tool-call grammars writing `calls`; built on first need."""
        with self._lock:
            if self._token_bytes is None:
                tokenizer = self._tokenizer
                self._token_bytes = TokenBytes(
                    [  # special tokens (EOS, padding ids) write no text
                        b"" if tokenizer.is_special_token(i) else tokenizer.decode_bytes([i])
                        for i in range(tokenizer.vocab_size)
                    ],
                    tokenizer.eos_tokens,
                )
            if calls not in self._number_bounds:
                bound = llguidance.LLMatcher(
                    self._tokenizer, llguidance.LLMatcher.grammar_from_lark(number_bound_grammar(calls)),
                    log_level=0, limits=_LIMITS,
                )
                if bound.is_error():  # a fixed grammar of Parley's own: a bug, not a request's fault
                    raise RuntimeError(f"the number bound does not compile: {bound.get_error()}")
                self._number_bounds[calls] = bound
            return self._token_bytes, self._number_bounds[calls]

    def _compiled(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher left at the grammar's start, copied for each request. Copies share the lexer
        built lazily while masks are computed, so later requests start warm."""
        key = (grammar.kind, grammar.value)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Compiled outside the lock: a large grammar takes up to a second (the GIL is released).
        # First in the sandbox, which refuses what costs too much (or would crash this process).
        text = _to_llguidance(grammar)
        try:
            error = self._sandbox.check(text)
        except GrammarTooCostly as e:
            raise GrammarError(f"invalid {grammar.kind} grammar: {e}") from None
        if error:
            raise GrammarError(f"invalid {grammar.kind} grammar: {error}")
        compiled = on_deep_stack(
            lambda: llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=_LIMITS)
        )
        if compiled.is_error():  # the sandbox compiled it: not expected
            raise GrammarError(f"invalid {grammar.kind} grammar: {compiled.get_error()}")
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _to_llguidance(grammar: Grammar) -> str:
    match grammar.kind:
        case "json":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(
                    grammar.value, defaults=_JSON_DEFAULTS
                )
            except ValueError as e:  # not JSON text
                raise GrammarError(f"invalid json grammar: {e}") from None
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_DEFAULTS
            )
        case "regex":
            return llguidance.LLMatcher.grammar_from_regex(grammar.value)
        case "lark":
            return llguidance.LLMatcher.grammar_from_lark(grammar.value)
    raise GrammarError(
        f"unknown grammar kind {grammar.kind!r}: expected json, json_object, regex or lark"
    )
