"""The process `GrammarSandbox` compiles grammars in, and the deep stack both compile on.

Run as a script (`python -I compile_worker.py`), it imports nothing of Parley's, so that it starts
without torch. It reads one JSON line to set up ({"tokenizer", "n_vocab", "eos", "memory_bytes"}),
answers it with {"ready": true}, then for each line holding a grammar (llguidance's JSON text, as a
JSON string) compiles it and answers {"error": "..."} ("" when it compiled). Its address space is
capped at what it uses once set up plus `memory_bytes`; a compilation that needs more kills it,
which its parent reads as a grammar too costly to compile. It exits when its input closes.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

# llguidance compiles JSON Schemas recursively: a chain of 5,000 $refs needs more than the 8 MB
# stack a thread gets by default and crashed the process. Its own cap (50,000 schema nodes) is
# reached within 250 MB of stack in the deepest chains we could build.
COMPILE_STACK_BYTES = 256 << 20
# llguidance's limits (LLParserLimits), the same here and in the server: its defaults, with short
# errors (it otherwise appends its parser state and the whole grammar).
LIMITS = {"verbose_errors": False}

T = TypeVar("T")


def on_deep_stack(fn: Callable[[], T]) -> T:
    """fn() on a thread with a COMPILE_STACK_BYTES stack (only the pages it touches are used)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            result.append((False, exc))

    previous = threading.stack_size(COMPILE_STACK_BYTES)
    try:
        thread = threading.Thread(target=run, name="grammar-compile")
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def main() -> None:
    import llguidance

    setup = json.loads(sys.stdin.readline())
    tokenizer = llguidance.LLTokenizer(setup["tokenizer"], n_vocab=setup["n_vocab"], eos_token=setup["eos"])
    limits = llguidance.LLParserLimits(**LIMITS)
    cap = _address_space_bytes() + COMPILE_STACK_BYTES + setup["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def serve() -> None:  # one thread for all grammars: a second deep stack might not fit
        _answer({"ready": True})
        for line in sys.stdin:
            matcher = llguidance.LLMatcher(tokenizer, json.loads(line), log_level=0, limits=limits)
            _answer({"error": matcher.get_error() if matcher.is_error() else ""})
            del matcher

    on_deep_stack(serve)


def _answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


if __name__ == "__main__":
    main()
