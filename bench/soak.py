"""Soak: many streaming chat requests, a share of whose clients leave mid-stream, against a Parley
server on 127.0.0.1 that this script starts (a tiny random model unless --model-id names one).

    python bench/soak.py                                  # 1,000 requests, 64 at a time, 20% leave
    python bench/soak.py --requests 200 --concurrency 32 --model-id /path/to/model

Checks what issue 15 promises and prints the figures: every request whose client stayed got its
whole answer (every token, then [DONE]), no KV block is in use once the server is idle, and the
server's RSS is back within 10% of what it was after a warm-up wave. Bounded: one warm-up wave and
`--requests` requests, then exit. tests/api/test_soak.py runs a smaller soak with `soak()`.

PyTorch keeps the oneDNN kernels it builds for each shape of the projections' input (each number
of rows) in two caches of 1,024 entries; under a soak's ever-changing batches they fill up, and the
server's RSS rose by ~220 MB on the tiny model before it levelled off (+229, +47, +13, +8, +3 MB
over five soaks of 1,000 requests). That is not a leak but would hide one, so the server here
keeps 16 of each (`--onednn-cache`; 1024 is PyTorch's default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # server.py, tiny_model.py

TOPICS = ["a fox", "the sea", "a city at night", "a robot", "the moon", "a small boat", "winter", "a library"]
RSS_TOLERANCE = 0.10
# PyTorch's caches of oneDNN kernels (see above): ideep's and oneDNN's own
ONEDNN_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
IDLE_TIMEOUT_S = 120.0


@dataclass
class SoakResult:
    requests: int
    left: int = 0  # clients that disconnected mid-stream on purpose
    whole: int = 0  # clients that stayed and got every token, the finish reason and [DONE]
    broken: list[str] = field(default_factory=list)  # what went wrong with the others that stayed
    statuses: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    cancelled: float = 0.0  # requests the server counted as cancelled by their client
    kv_blocks_used: float = -1.0  # once idle
    kv_blocks_total: float = 0.0
    rss_start_mb: float = 0.0  # the server's, before any request
    rss_before_mb: float = 0.0  # after the warm-up wave, idle
    rss_peak_mb: float = 0.0  # sampled during the soak
    rss_after_mb: float = 0.0  # after the soak, idle

    def problems(self) -> list[str]:
        """What breaks the promise; empty when it holds."""
        problems = list(self.broken[:5])
        if self.whole != self.requests - self.left:
            problems.append(f"{self.requests - self.left - self.whole} of the requests that stayed were not answered whole")
        if self.kv_blocks_used != 0:
            problems.append(f"{self.kv_blocks_used:.0f} KV blocks still in use once idle")
        if self.rss_after_mb > self.rss_before_mb * (1 + RSS_TOLERANCE):
            problems.append(f"RSS {self.rss_after_mb:.0f} MB after, against {self.rss_before_mb:.0f} MB before")
        return problems

    def report(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.1f} s: {self.left} clients left mid-stream "
                f"({self.cancelled:.0f} of them while their request still ran), {self.whole} of the "
                f"{self.requests - self.left} that stayed answered whole; statuses {dict(self.statuses)}\n"
                f"KV blocks in use once idle: {self.kv_blocks_used:.0f} of {self.kv_blocks_total:.0f}\n"
                f"server RSS MB: {self.rss_start_mb:.0f} at start, {self.rss_before_mb:.0f} after the warm-up, "
                f"{self.rss_peak_mb:.0f} peak, {self.rss_after_mb:.0f} after "
                f"({(self.rss_after_mb / self.rss_before_mb - 1) * 100:+.1f}%)")


async def soak(base_url: str, server_pid: int, requests: int = 1000, concurrency: int = 64,
               leave_share: float = 0.2, max_tokens: int = 16, seed: int = 0) -> SoakResult:
    """Run the soak against the server at `base_url` (process `server_pid`, for its RSS)."""
    result = SoakResult(requests, rss_start_mb=rss_mb(server_pid))
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(_stream(client, i, max_tokens, None) for i in range(concurrency)))  # warm-up
        before = await _idle(client)
        result.rss_before_mb = rss_mb(server_pid)

        plan = [rng.randint(1, max_tokens - 1) if rng.random() < leave_share else None for _ in range(requests)]
        slots = asyncio.Semaphore(concurrency)
        sampling = asyncio.create_task(_sample_rss(server_pid, result))

        async def one(i: int) -> None:
            async with slots:
                status, problem = await _stream(client, concurrency + i, max_tokens, plan[i])
            result.statuses[status] += 1
            if plan[i] is not None:
                result.left += 1
            elif problem:
                result.broken.append(f"request {i}: {problem}")
            else:
                result.whole += 1

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
        result.seconds = time.monotonic() - started
        sampling.cancel()
        metrics = await _idle(client)
    result.cancelled = metrics.get("parley_request_cancelled", 0) - before.get("parley_request_cancelled", 0)
    result.kv_blocks_used = metrics.get("parley_kv_blocks_used", -1.0)
    result.kv_blocks_total = metrics.get("parley_kv_blocks_total", 0.0)
    result.rss_after_mb = rss_mb(server_pid)
    return result


async def _stream(client: httpx.AsyncClient, i: int, max_tokens: int, leave_after: int | None) -> tuple[int, str]:
    """One streamed chat; with `leave_after`, the client disconnects after that many chunks.
    Returns the status and what was wrong with the answer ("" if it came whole)."""
    body = {"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, story {i}."}],
            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True}
    tokens, finish, done = 0, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, f"status {response.status_code}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                return 200, f"error event {chunk['error']}"
            for choice in chunk["choices"]:
                if choice["finish_reason"] is None:
                    tokens += 1
                else:
                    finish = choice["finish_reason"]
            if leave_after is not None and tokens >= leave_after:
                return 200, "left"  # leaving the block closes the connection mid-stream
    if not (done and finish == "length" and tokens == max_tokens):
        return 200, f"{tokens} of {max_tokens} tokens, finish_reason {finish}, [DONE] {done}"
    return 200, ""


async def _idle(client: httpx.AsyncClient) -> dict[str, float]:
    """/metrics once nothing runs, waits or holds a KV block (bounded wait)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        metrics = parse_metrics((await client.get("/metrics")).text)
        busy = sum(metrics.get(name, 0) for name in ("parley_kv_blocks_used", "tgi_batch_current_size", "tgi_queue_size"))
        if busy == 0 or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.1)


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text body."""
    samples = (line.split() for line in text.splitlines() if line and not line.startswith("#") and "{" not in line)
    return {parts[0]: float(parts[1]) for parts in samples if len(parts) == 2}


async def _sample_rss(pid: int, result: SoakResult) -> None:
    while True:
        result.rss_peak_mb = max(result.rss_peak_mb, rss_mb(pid))
        await asyncio.sleep(0.2)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def onednn_cache_env(entries: int) -> dict[str, str]:
    """Environment variables that make PyTorch keep `entries` oneDNN kernels per cache."""
    return {name: str(entries) for name in ONEDNN_CACHE_VARIABLES}


def start_server(model: str, log_folder: Path, onednn_cache: int = 16, dtype: str = "float32"):
    """A started server (tests/server.py's ServerProcess: 127.0.0.1, a free port) on `model`; the
    caller stops it."""
    from server import ServerProcess

    return ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", dtype,
                          "--num-threads", "1", "--max-batch-total-tokens", "16384"],
                         log_folder / "server.log", env=onednn_cache_env(onednn_cache)).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--leave", type=float, default=0.2, help="share of clients that disconnect mid-stream")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model-id", help="model to serve (default: a tiny random one, written to a temp folder)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--onednn-cache", type=int, default=16,
                        help="oneDNN kernels PyTorch keeps per cache in the server (its default: 1024)")
    args = parser.parse_args()
    from tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        server = start_server(args.model_id or make_tiny_model(Path(folder) / "model"), Path(folder),
                              args.onednn_cache, args.dtype)
        try:
            result = asyncio.run(soak(server.url, server.proc.pid, args.requests, args.concurrency, args.leave,
                                      args.max_tokens))
        finally:
            server.stop()
    print(f"{args.requests} requests, {args.concurrency} at a time, {args.leave:.0%} leaving, {args.max_tokens} tokens "
          f"each; the server keeps {args.onednn_cache} oneDNN kernels per cache")
    print(result.report())
    problems = result.problems()
    print("OK: the promise holds" if not problems else "FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
