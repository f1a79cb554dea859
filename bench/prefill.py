"""Prefill and decode speed as the context grows: one request at a time, distinct prompts (no
prefix-cache hits) of growing length. Prints prompt tokens per second (one new token; the best of
two tries per length) and, after the same prompts, decode tokens per second (64 new tokens, from
the first to the last): the median of --rounds passes over the lengths, each pass one request a
length in turn, so that every length is measured across the same minutes (on the AMD VM of
BENCHMARKS.md, single decode figures taken a minute apart gave 4,000 tokens 49% to 81% of the
speed at 166), and each length's median against the first length's.

    python bench/prefill.py                       # 166 to 4,000 tokens, bf16, 2 threads
    python bench/prefill.py --lengths 512 2048 --dtype float32
    python bench/prefill.py --lengths 8000 --max-total-tokens 8192   # past the default limit

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


DECODED = 64


async def measure(engine, lengths: list[int], rounds: int) -> tuple[list[float], list[float]]:
    from parley.types import GenerationRequest, StoppingCriteria, TokenEvent

    words = " ".join(f"word{i}" for i in range(max(lengths)))
    prefill, prompts = [], []
    for n in lengths:
        best = float("inf")
        for attempt in range(2):
            ids = engine.tokenizer.encode(f"z{attempt}q{n} {words}")[:n]  # a new first token: nothing cached
            request = GenerationRequest(engine.tokenizer.decode(ids), stopping=StoppingCriteria(max_new_tokens=1))
            started = time.perf_counter()
            async for _ in engine.generate(request):
                pass
            best = min(best, time.perf_counter() - started)
        prefill.append(n / best)
        prompts.append(engine.tokenizer.decode(ids))
    speeds: list[list[float]] = [[] for _ in lengths]
    for _ in range(rounds):
        for prompt, speed in zip(prompts, speeds):
            request = GenerationRequest(prompt, stopping=StoppingCriteria(max_new_tokens=DECODED + 1,
                                                                          min_new_tokens=DECODED + 1))
            times = [time.perf_counter() async for event in engine.generate(request) if isinstance(event, TokenEvent)]
            speed.append(DECODED / (times[-1] - times[0]))
    return prefill, [statistics.median(speed) for speed in speeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[166, 666, 1330, 2662, 4000])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="decode passes over the lengths (the median is shown)")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="the server's --max-total-tokens (default: min(context, 4096), so prompts up to 4,095)")
    args = parser.parse_args()

    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine
    from parley.kernels.linear import projection_kernel

    engine = AsyncEngine.load(EngineConfig(dtype=args.dtype, num_threads=args.threads, max_total_tokens=args.max_total_tokens))
    engine.start()
    try:
        prefill, decode = asyncio.run(measure(engine, args.lengths, args.rounds))
    finally:
        engine.core.stop()
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    print(f"CPU: {cpu}; {args.dtype}, {args.threads} threads; projections: {projection_kernel(engine.core.runner.model.layers[0].qkv_weight)}")
    print("| prompt tokens | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("|---" * (len(args.lengths) + 1) + "|")
    print("| prefill tok/s | " + " | ".join(f"{s:.0f}" for s in prefill) + " |")
    print("| decode tok/s | " + " | ".join(f"{s:.1f}" for s in decode) + " |")
    print(f"| decode vs {args.lengths[0]} tokens | " + " | ".join(f"{s / decode[0]:.0%}" for s in decode) + " |")


if __name__ == "__main__":
    main()
