"""Structured output: grammars (JSON Schema, regex, Lark) turned into per-step token masks (llguidance)."""

from parley.structured.bitmask import allocate_bitmask, bitmask_to_bool, fill_bitmasks
from parley.structured.compiler import GrammarCompiler, GrammarError
from parley.structured.matcher import GrammarMatcher

__all__ = [
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "allocate_bitmask",
    "bitmask_to_bool",
    "fill_bitmasks",
]
