"""What draft tokens save, engine-only, one request at a time: each prompt's answer generated once
plain, then again with drafts, and the times, steps and texts compared.

    python bench/prediction.py [--sampled] [--dtype float32] [--threads 2] [--max-tokens 128]
    python bench/prediction.py --speculate 4 [--sampled]
    python bench/prediction.py --concurrency 8 [--sampled]   # then 8 requests at once: tok/s
    python bench/prediction.py --json [--sampled]            # each answer held to a JSON schema

Default: the plain answer's own text as the prediction (Mistral's `prediction`): a correct one.
`--speculate N`: no prediction, N draft tokens a step from the request's own prompt and output
(prompt lookup, `parley serve --speculate N`). `--sampled`: temperature 0.7, top_p 0.95 and a seed
instead of greedy; the texts must be the same either way. `--json`: every answer is held to the
schema {"answer": string} (response_format), whose grammar masks each draft position too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.types import FinalEvent, GenerationRequest, Grammar, SamplingParams, StoppingCriteria

ANSWER = Grammar("json", json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                                    "required": ["answer"], "additionalProperties": False}))
PROMPTS = [
    "Rewrite this sentence in the passive voice: The cat chased the mouse across the garden.",
    "Write a Python function that returns the factorial of n.",
    "List the days of the week.",
    "Explain what a prime number is.",
    "Add type hints to this function and return the whole function:\n\ndef area(width, height):\n"
    "    if width < 0 or height < 0:\n        raise ValueError('negative size')\n    return width * height\n",
    "Correct the spelling in this text and return the whole text: Yesterday we whent to the market and "
    "bougth apples, pears and a large watermellon for the picnic.",
]


async def timed(engine: AsyncEngine, prompt: str, args, prediction: str | None):
    sampling = SamplingParams(do_sample=True, temperature=0.7, top_p=0.95) if args.sampled else SamplingParams()
    request = GenerationRequest(prompt, add_special_tokens=False, draft_text=prediction, sampling=sampling,
                                seeds=[1] if args.sampled else None, grammar=ANSWER if args.json else None,
                                stopping=StoppingCriteria(max_new_tokens=args.max_tokens))
    steps, start = engine.core.num_steps, time.perf_counter()
    async for event in engine.generate(request):
        if isinstance(event, FinalEvent):
            final = event
    return final, time.perf_counter() - start, engine.core.num_steps - steps


async def main(args) -> None:
    engine = AsyncEngine.load(EngineConfig(dtype=args.dtype, num_threads=args.threads))
    engine.start()
    drafts = f"--speculate {args.speculate}" if args.speculate else "prediction"
    print(f"dtype={args.dtype} threads={args.threads} max_tokens={args.max_tokens} "
          f"{'sampled' if args.sampled else 'greedy'}{', JSON' if args.json else ''}, drafts from: {drafts}")
    print("| prompt | tokens | plain s | steps | drafted s | steps | speed-up | same text |")
    print("|---|---|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    if args.json:  # the grammar compiled (and cached) before anything is timed
        await timed(engine, engine.chat_template.render([{"role": "user", "content": PROMPTS[0]}]), args, None)
    for prompt in PROMPTS:
        rendered = engine.chat_template.render([{"role": "user", "content": prompt}])
        engine.core.speculate = 0
        plain, plain_s, plain_steps = await timed(engine, rendered, args, None)
        engine.core.speculate = args.speculate  # read as each request arrives
        fast, fast_s, fast_steps = await timed(engine, rendered, args, None if args.speculate else plain.text)
        total[0], total[1] = total[0] + plain_s, total[1] + fast_s
        print(f"| {prompt[:32]!r}... | {plain.generated_tokens} | {plain_s:.2f} | {plain_steps} | {fast_s:.2f} | "
              f"{fast_steps} | {plain_s / fast_s:.2f}x | {fast.text == plain.text} |", flush=True)
    stats = engine.stats()
    print(f"all prompts: {total[0]:.2f} s plain, {total[1]:.2f} s drafted ({total[0] / total[1]:.2f}x); "
          f"drafts kept {stats.draft_accepted_tokens} of {stats.draft_tokens}")
    if args.concurrency > 1:
        await concurrently(engine, args)
    await engine.shutdown()


async def concurrently(engine: AsyncEngine, args) -> None:
    """`--concurrency N` requests at once (the prompts in turn), plain and then drafted: tok/s."""
    rendered = [engine.chat_template.render([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
                for i in range(args.concurrency)]
    engine.core.speculate = 0
    texts = [(await timed(engine, r, args, None))[0].text for r in rendered[: len(PROMPTS)]]
    for name, speculate, predictions in (("plain", 0, [None] * len(rendered)),
                                         ("drafted", args.speculate,
                                          [None if args.speculate else texts[i % len(PROMPTS)] for i in range(len(rendered))])):
        engine.core.speculate = speculate
        start = time.perf_counter()
        done = await asyncio.gather(*(timed(engine, r, args, p) for r, p in zip(rendered, predictions)))
        seconds = time.perf_counter() - start
        tokens = sum(final.generated_tokens for final, _, _ in done)
        print(f"concurrency {args.concurrency}, {name}: {tokens / seconds:.1f} tok/s ({tokens} tokens in {seconds:.2f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sampled", action="store_true")
    parser.add_argument("--speculate", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="answers held to a JSON schema")
    parser.add_argument("--concurrency", type=int, default=1, help="then N requests at once, plain and drafted")
    asyncio.run(main(parser.parse_args()))
