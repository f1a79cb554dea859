"""A grammar is compiled in a process of its own first, within a bound of time and memory.

llguidance's limits (`LLParserLimits`) bound most of what a grammar may cost, but not all: the
emptiness check of an `allOf` of 24 unanchored patterns (a schema of 600 bytes) ran for minutes,
disjointness checks of `patternProperties` grow with the square of their number (3,000 of them: more
than 5 minutes), and a chain of 5,000 `$ref`s overflowed the stack and killed the server. So before
the server compiles a grammar it has not seen, a worker process compiles it (`compile_worker.py`);
if the worker takes longer than `timeout_s`, needs more than `memory_bytes` or dies, it is killed
and the grammar is refused. The worker is started on first need and again after such a kill.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from parley.structured import compile_worker

COMPILE_TIMEOUT_S = 10.0  # the largest schemas we found that compile took under 1 s
COMPILE_MEMORY_BYTES = 1 << 30  # ... and under 250 MB
_START_TIMEOUT_S = 120.0  # loading the vocabulary: a second or two, more on a busy machine


class GrammarTooCostly(Exception):
    """The grammar took longer or needed more memory to compile than the sandbox allows."""


class GrammarSandbox:
    """Compiles grammars in a worker process, one at a time. Thread-safe."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_token_ids: list[int],
                 timeout_s: float = COMPILE_TIMEOUT_S, memory_bytes: int = COMPILE_MEMORY_BYTES):
        self._setup = json.dumps({"tokenizer": tokenizer_json, "n_vocab": n_vocab, "eos": list(eos_token_ids),
                                  "memory_bytes": memory_bytes})
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def check(self, grammar: str) -> str:
        """Compile `grammar` (llguidance's JSON text) in the worker: "" if it compiles, else
        llguidance's error. Raises `GrammarTooCostly` past the time or memory bound."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._stop()  # gone (killed from outside): start another
            proc = self._worker()
            proc.stdin.write(json.dumps(grammar) + "\n")
            proc.stdin.flush()
            answer = self._read(proc, self.timeout_s)
            if answer is None:
                self._stop()
                raise GrammarTooCostly(
                    f"the grammar is too costly to compile (more than {self.timeout_s:g} s or "
                    f"{self.memory_bytes >> 20} MB)")
            return answer["error"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _worker(self) -> subprocess.Popen:
        if self._proc is None:
            # -I: no user site, no PYTHON* variables, not the script's folder on sys.path
            proc = subprocess.Popen([sys.executable, "-I", str(Path(compile_worker.__file__))],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc.stdin.write(self._setup + "\n")
            proc.stdin.flush()
            if self._read(proc, _START_TIMEOUT_S) is None:
                proc.kill()
                proc.wait()
                raise RuntimeError("the grammar compile worker did not start")
            self._proc = proc
        return self._proc

    @staticmethod
    def _read(proc: subprocess.Popen, timeout_s: float) -> dict | None:
        """The worker's next answer, or None if it has none within `timeout_s` (or died)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                line = proc.stdout.readline()
                return json.loads(line) if line else None  # "": the worker died

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
