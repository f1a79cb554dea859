"""What constrained decoding costs: output tokens/s over HTTP at concurrency 8, unconstrained vs a
JSON schema (the same prompts, every answer exactly --max-tokens long, rounds of each in turn), and
grammar compile time.

    python bench/structured.py                # default model, bf16, 2 threads
    python bench/structured.py --threads 1 --requests 16

Lengths are equal by construction: unconstrained requests set min_tokens = max_tokens; the schema
asks for more items than fit in max_tokens, so max_tokens cuts every answer ("length"). (min_tokens
would not do it there: a complete grammar ends the output before min_tokens.)

Compile time: in-process GrammarCompiler.validate of each grammar, and over HTTP the latency of a
max_tokens=1 request that compiles its schema (a fresh "title" defeats the cache) vs one that reuses it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
import uuid

import httpx

from run import USER_PROMPTS, free_port

LONG_LIST = {  # cannot end within max_tokens: every answer is cut at exactly max_tokens
    "type": "object",
    "properties": {"ideas": {"type": "array", "minItems": 200,
                             "items": {"type": "string", "minLength": 5, "maxLength": 40}}},
    "required": ["ideas"], "additionalProperties": False,
}
COMPILE_CASES = {
    "flat object": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"]},
    "nested + $ref + pattern": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 10},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "kind": {"enum": ["walk", "ride", "drive"]}},
        "required": ["path", "zip", "kind"], "additionalProperties": False,
    },
    "long list (bench schema)": LONG_LIST,
}


@contextlib.asynccontextmanager
async def running_server(args):
    port = free_port()
    cmd = [sys.executable, "-m", "parley", "serve", "--port", str(port), "--dtype", args.dtype,
           "--num-threads", str(args.threads), "--max-concurrent-requests", "256"]
    server = subprocess.Popen(cmd + (["--model-id", args.model_id] if args.model_id else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=httpx.Limits(max_connections=64)) as http:
            for _ in range(1200):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("server did not become healthy in 120 s")
            yield http
    finally:
        server.terminate()
        server.wait(30)


async def chat(http: httpx.AsyncClient, i: int, max_tokens: int, **extra) -> tuple[int, float]:
    body = {"messages": [{"role": "user", "content": "Answer in JSON. " + USER_PROMPTS[i % len(USER_PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.95, "seed": i, **extra}
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"], time.perf_counter() - started


async def throughput(http, args, extra: dict) -> tuple[float, int, float]:
    """(tokens/s, output tokens, median request latency) of args.requests requests, args.concurrency at a time."""
    queue = list(range(args.requests))
    results = []

    async def worker():
        while queue:
            results.append(await chat(http, queue.pop(), args.max_tokens, **extra))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return tokens / wall, tokens, statistics.median(s for _, s in results)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


async def bench_http(args) -> None:
    async with running_server(args) as http:
        await chat(http, 0, 4)  # warm-up
        await chat(http, 0, 4, response_format=schema_format(LONG_LIST))  # compiled once, as in steady state
        cases = {"unconstrained": {"min_tokens": args.max_tokens},
                 "json schema": {"response_format": schema_format(LONG_LIST)}}
        # Rounds alternate between the cases: the machine's speed drifts by 10-20% over minutes,
        # which back-to-back runs would count as a difference between the cases.
        runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, extra in cases.items():
                runs[name].append(await throughput(http, args, extra))
        print(f"\nconcurrency {args.concurrency}, {args.requests} requests per round, {args.rounds} rounds, "
              f"max_tokens {args.max_tokens}; medians over the rounds")
        print("| output        | tok/s  | tokens/round | median latency s | vs unconstrained |")
        print("|---------------|--------|--------------|------------------|------------------|")
        base = None
        for name, results in runs.items():
            rate = statistics.median(r for r, _, _ in results)
            latency = statistics.median(s for _, _, s in results)
            base = base or rate
            print(f"| {name:13} | {rate:6.1f} | {results[0][1]:12} | {latency:16.2f} | {rate / base - 1:+15.1%} |")

        print("\nover HTTP, max_tokens=1 (median of 5): a request that compiles its schema vs one that reuses it")
        print("| schema                   | compiling ms | cached ms |")
        print("|--------------------------|--------------|-----------|")
        for name, schema in COMPILE_CASES.items():
            cold, warm = [], []
            for _ in range(5):
                fresh = {**schema, "title": uuid.uuid4().hex}
                cold.append((await chat(http, 0, 1, response_format=schema_format(fresh)))[1])
                warm.append((await chat(http, 0, 1, response_format=schema_format(fresh)))[1])
            print(f"| {name:24} | {statistics.median(cold) * 1e3:12.1f} | {statistics.median(warm) * 1e3:9.1f} |")


def bench_compile(args) -> None:
    from parley.engine.async_engine import default_model_path
    from parley.structured import GrammarCompiler
    from parley.tokenization.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model_id or default_model_path())
    compiler = GrammarCompiler(tokenizer.backend, tokenizer.eos_token_ids, tokenizer.backend.get_vocab_size())
    print("\nin-process GrammarCompiler.validate (median of 5, each a grammar not compiled before)")
    print("| grammar                  | compile ms |")
    print("|--------------------------|------------|")
    times: dict[str, list[float]] = {}
    for i in range(5):
        for name, grammar in fresh_grammars(f"run {i}").items():
            started = time.perf_counter()
            compiler.validate(grammar)
            times.setdefault(name, []).append(time.perf_counter() - started)
    for name, samples in times.items():
        print(f"| {name:24} | {statistics.median(samples) * 1e3:10.1f} |")


def fresh_grammars(tag: str) -> dict:
    """The compile cases as grammars whose text includes `tag`, so none comes from the compiler's cache."""
    from parley.tools import tool_call_grammar
    from parley.types import Grammar

    grammars = {name: Grammar("json", json.dumps({**schema, "title": tag})) for name, schema in COMPILE_CASES.items()}
    parameters = {**COMPILE_CASES["flat object"], "title": tag}
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters}} for i in range(128)]
    grammars["tool calls, 2 tools"] = tool_call_grammar(tools[:2], "auto")
    grammars["tool calls, 128 tools"] = tool_call_grammar(tools, "auto")
    return grammars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"model={args.model_id or 'SmolLM2-135M-Instruct Q4_1 (default)'} dtype={args.dtype} threads={args.threads}")
    asyncio.run(bench_http(args))
    bench_compile(args)


if __name__ == "__main__":
    main()
