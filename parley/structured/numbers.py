"""Numbers in JSON output carry at most the digits a double holds.

llguidance's JSON grammars let a number run on for as many digits as the model likes (its JSON
options have no digit limit, and a schema's `minimum`/`maximum` bound a float's integer part but
not its fraction, nor allow an exponent). So JSON outputs are also held to a second, lexical
grammar: any text in which every number outside a string has at most `MANTISSA_DIGITS` digits
before its exponent and at most `EXPONENT_DIGITS` in it, e.g. 1.2345678901234567e-308. A token
must be allowed by both grammars (see `GrammarMatcher`).

The lexical grammar knows nothing of the schema: strings, punctuation, literals and whitespace
pass untouched, so the schema's own constraints all still hold.
"""

from __future__ import annotations

import json

from parley.types import CallFormat

MANTISSA_DIGITS = 17  # enough to tell any two doubles apart
EXPONENT_DIGITS = 3  # doubles reach 1.8e308

# One Lark terminal (a single lexeme: cheap to follow). Between numbers only what JSON has there:
# whitespace, punctuation, literals and strings; none of it continues a number, so no long digit
# run can pass as two numbers, nor an exponent as a number of its own. (A grammar with other text
# there, e.g. a schema's own "x-guidance" separators, loses the bound: see `GrammarMatcher`.)
_TERMINALS = rf"""
NUMBER: "-"? MANTISSA EXPONENT?
MANTISSA: /(0|[1-9][0-9]*)(\.[0-9]+)?/ & /([0-9]\.?){{1,{MANTISSA_DIGITS}}}/
EXPONENT: /[eE][+-]?[0-9]{{1,{EXPONENT_DIGITS}}}/
STRING: /"([^"\\]|\\(?s:.))*"/
NOT_NUMBER: /[ \t\n\r{{}}\[\],:]/ | "true" | "false" | "null" | STRING
JSON_TEXT: (NUMBER? NOT_NUMBER)* NUMBER?
"""


def number_bound_grammar(calls: CallFormat | None = None) -> str:
    """The lexical grammar (Lark) for JSON output, or for the output of a tool-call grammar: free
    text without the calls' lead (or, when calls are the whole output, not beginning as they do),
    then calls, whose JSON is bounded."""
    if calls is None:
        return "start: JSON_TEXT\n" + _TERMINALS
    markers = sorted({m for m in (calls.opening, calls.start, calls.end, calls.separator, calls.closing) if m})
    body = f"CALLS: (NUMBER? (NOT_NUMBER{''.join(' | ' + json.dumps(m) for m in markers)}))* NUMBER?\n"
    if not calls.whole:
        lead = json.dumps(calls.lead)
        return (
            "start: OUTPUT\n"
            "OUTPUT: FREE_TEXT (CALL_START CALLS)?\n"
            f"FREE_TEXT: ANY & ~(ANY {lead} ANY)\n"
            "ANY: /(?s:.*)/\n"
            f"CALL_START: {lead}\n" + body + _TERMINALS
        )
    head = json.dumps(calls.lead + "{")
    token = "" if calls.marker_token is None else f"<[{calls.marker_token}]> "
    return (
        f"start: FREE_TEXT | {token}CALLS_TEXT\n"
        f"FREE_TEXT: ANY & ~({head} ANY)\n"
        "ANY: /(?s:.*)/\n"
        f"CALLS_TEXT: {head} CALLS\n" + body + _TERMINALS
    )
