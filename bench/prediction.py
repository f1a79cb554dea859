"""What a correct predicted output (Mistral's `prediction`) saves: greedy answers generated once
plain, then again with their own text as the prediction, engine-only, one request at a time.

    python bench/prediction.py [--dtype float32] [--threads 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.types import FinalEvent, GenerationRequest, StoppingCriteria

PROMPTS = [
    "Rewrite this sentence in the passive voice: The cat chased the mouse across the garden.",
    "Write a Python function that returns the factorial of n.",
    "List the days of the week.",
    "Explain what a prime number is.",
]


async def timed(engine: AsyncEngine, prompt: str, max_tokens: int, prediction: str | None):
    request = GenerationRequest(prompt, add_special_tokens=False, draft_text=prediction,
                                stopping=StoppingCriteria(max_new_tokens=max_tokens))
    steps, start = engine.core.num_steps, time.perf_counter()
    async for event in engine.generate(request):
        if isinstance(event, FinalEvent):
            final = event
    return final, time.perf_counter() - start, engine.core.num_steps - steps


async def main(args) -> None:
    engine = AsyncEngine.load(EngineConfig(dtype=args.dtype, num_threads=args.threads))
    engine.start()
    print(f"dtype={args.dtype} threads={args.threads} max_tokens={args.max_tokens}")
    print("| prompt | tokens | plain s | steps | predicted s | steps | speed-up | same text |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt in PROMPTS:
        rendered = engine.chat_template.render([{"role": "user", "content": prompt}])
        plain, plain_s, plain_steps = await timed(engine, rendered, args.max_tokens, None)
        fast, fast_s, fast_steps = await timed(engine, rendered, args.max_tokens, plain.text)
        print(f"| {prompt[:32]}... | {plain.generated_tokens} | {plain_s:.2f} | {plain_steps} | {fast_s:.2f} | "
              f"{fast_steps} | {plain_s / fast_s:.1f}x | {fast.text == plain.text} |", flush=True)
    await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    asyncio.run(main(parser.parse_args()))
