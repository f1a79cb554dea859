"""parley/observability/console.py: the weights' progress bar and the status line."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

from parley.observability.console import LoadProgress, StatusLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_full(monkeypatch):
    monkeypatch.setattr("parley.observability.console.REDRAW_S", 0.0)
    out = Terminal()
    progress = LoadProgress("model.gguf", total_bytes=4_000_000, stream=out)
    for _ in range(3):
        progress.advance(1_000_000)
    summary = progress.finish()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 4 and out.getvalue().endswith("\n")
    assert "[" + "#" * 22 + "." * 8 + "]  75% 3 tensors, 3.0/4.0 MB" in frames[2]
    assert "[" + "#" * 30 + "] 100% 3 tensors, 3.0/3.0 MB" in frames[3]  # all there is was read
    assert re.search(r"MB/s\x1b\[K", frames[0])
    assert re.fullmatch(r"read 3 tensors, 3\.0 MB in [\d.]+ s \([\d.]+ MB/s\)", summary)


def test_in_a_log_file_a_quick_load_writes_no_bar(monkeypatch, caplog):
    out = io.StringIO()  # not a terminal
    progress = LoadProgress("model.gguf", total_bytes=100, stream=out)
    with caplog.at_level(logging.INFO, "parley"):
        progress.advance(100)
        progress.finish()
    assert out.getvalue() == "" and caplog.records == []  # the caller logs the summary it returns


def test_in_a_log_file_a_slow_load_logs_a_line_now_and_then(monkeypatch, caplog):
    monkeypatch.setattr("parley.observability.console.LOG_EVERY_S", 0.0)
    progress = LoadProgress("model.gguf", total_bytes=200, stream=io.StringIO())
    with caplog.at_level(logging.INFO, "parley"):
        progress.advance(100)
    assert [r.getMessage()[:45] for r in caplog.records] == ["loading model.gguf [###############...............]"[:45]]
    assert "50% 1 tensors" in caplog.records[0].getMessage()


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 100
    generated_tokens: int = 0


def test_status_line_says_what_happened_since_the_last_one_and_nothing_when_idle():
    status = StatusLine()
    assert status.line(Stats(running=2), now=10.0) is None  # the first reading only starts the count
    line = status.line(Stats(running=2, waiting=1, kv_blocks_used=25, generated_tokens=50), now=12.0)
    assert line == "status: 2 running, 1 waiting, 25.0 tok/s, KV cache 25% (25/100 blocks)"
    # the last requests ended since: their tokens are still reported once
    assert status.line(Stats(generated_tokens=60), now=14.0).startswith("status: 0 running, 0 waiting, 5.0 tok/s")
    assert status.line(Stats(generated_tokens=60), now=16.0) is None  # idle
