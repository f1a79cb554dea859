"""Parley benchmark: output tokens/s, time to first token, inter-token latency and peak RSS at
concurrency 1, 8 and 32, for the engine alone and for the server over HTTP (streaming).

    python bench/run.py                      # engine and http, default model, bf16, 2 threads
    python bench/run.py --mode engine --concurrency 32 --dtype float32
    python bench/run.py --quantize int4         # 4-bit decoder projections

Run it on a quiet machine: two compute threads collapse when anything else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

USER_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List some tips for staying focused while studying.",
    "Describe the water cycle.",
    "What makes a good cup of tea?",
    "Tell me about the history of the printing press.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    tokens: int


class TokenClock:
    """Time to first token and the gaps between the next ones, for one request."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.gaps.append(now - self.last)
        self.last, self.tokens = now, self.tokens + 1

    def sample(self) -> Sample:
        return Sample(self.ttft or 0.0, self.gaps, self.tokens)


@dataclass
class Row:
    mode: str
    concurrency: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p90: float
    itl_mean: float
    rss_mb: float
    requests: int


def summarize(mode, concurrency, samples, wall, rss_mb) -> Row:
    ttfts = sorted(s.ttft for s in samples)
    gaps = [g for s in samples for g in s.gaps]
    return Row(mode, concurrency, sum(s.tokens for s in samples) / wall, statistics.median(ttfts),
               ttfts[int(0.9 * (len(ttfts) - 1))], statistics.fmean(gaps) if gaps else 0.0, rss_mb, len(samples))


async def run_wave(one, concurrency: int, requests_per_client: int) -> tuple[list[Sample], float]:
    async def client(c):
        return [await one(c * requests_per_client + i) for i in range(requests_per_client)]

    start = time.perf_counter()
    results = await asyncio.gather(*(client(c) for c in range(concurrency)))
    return [s for r in results for s in r], time.perf_counter() - start


# -- engine only -------------------------------------------------------------------------------
async def bench_engine(args) -> list[Row]:
    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine
    from parley.types import GenerationRequest, SamplingParams, StoppingCriteria, TokenEvent

    engine = AsyncEngine.load(EngineConfig(model_id=args.model_id, dtype=args.dtype, num_threads=args.threads,
                                           quantize=args.quantize))
    engine.start()
    prompts = [engine.chat_template.render([{"role": "user", "content": p}]) for p in USER_PROMPTS]

    async def one(i: int) -> Sample:
        request = GenerationRequest(
            prompts[i % len(prompts)], add_special_tokens=False, seeds=[i],
            sampling=SamplingParams(do_sample=True, temperature=0.7, top_p=0.95),
            stopping=StoppingCriteria(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens))
        clock = TokenClock()
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent):
                clock.tick()
        return clock.sample()

    rows = []
    await one(0)  # warm-up
    for concurrency in args.concurrency:
        samples, wall = await run_wave(one, concurrency, args.requests_per_client)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(summarize("engine", concurrency, samples, wall, rss))
        print_row(rows[-1])
    await engine.shutdown()
    return rows


# -- over HTTP ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def bench_http(args) -> list[Row]:
    port = free_port()
    cmd = [sys.executable, "-m", "parley", "serve", "--port", str(port), "--dtype", args.dtype,
           "--num-threads", str(args.threads), "--max-concurrent-requests", "256"]
    if args.model_id:
        cmd += ["--model-id", args.model_id]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=64)) as http:
            for _ in range(1200):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("server did not become healthy in 120 s")
            print(f"server ready in {time.perf_counter() - started:.1f}s")

            async def one(i: int) -> Sample:
                body = {"model": "parley", "stream": True, "max_tokens": args.max_tokens, "min_tokens": args.max_tokens,
                        "temperature": 0.7, "top_p": 0.95, "seed": i,
                        "messages": [{"role": "user", "content": USER_PROMPTS[i % len(USER_PROMPTS)]}]}
                clock = TokenClock()
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None \
                                and chunk["choices"][0].get("finish_reason") is None:
                            clock.tick()
                return clock.sample()

            await one(0)
            for concurrency in args.concurrency:
                samples, wall = await run_wave(one, concurrency, args.requests_per_client)
                rows.append(summarize("http", concurrency, samples, wall, peak_rss_mb(server.pid)))
                print_row(rows[-1])
    finally:
        server.terminate()
        server.wait(30)
    return rows


def print_row(r: Row) -> None:
    print(f"| {r.mode:6} | {r.concurrency:4} | {r.tokens_per_s:8.1f} | {r.ttft_p50 * 1000:8.0f} | "
          f"{r.ttft_p90 * 1000:8.0f} | {r.itl_mean * 1000:7.1f} | {r.rss_mb:7.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["engine", "http", "both"], default="both")
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int4"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=1)
    args = parser.parse_args()
    print(f"model={args.model_id or 'SmolLM2-135M-Instruct Q4_1 (default)'} dtype={args.dtype} "
          f"quantize={args.quantize} threads={args.threads} max_tokens={args.max_tokens} cpus={os.cpu_count()}")
    print("| mode   | conc | tok/s    | TTFT p50 | TTFT p90 | ITL ms  | RSS MB  |")
    print("|--------|------|----------|----------|----------|---------|---------|")
    if args.mode in ("engine", "both"):
        asyncio.run(bench_engine(args))
    if args.mode in ("http", "both"):
        asyncio.run(bench_http(args))


if __name__ == "__main__":
    main()
