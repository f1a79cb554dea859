"""Where a decode step's time goes, at 1, 8 and 32 sequences: projections, lm_head, attention,
rotary, norms, sampling, and the rest (the engine's Python, the scheduler, small ops).

    python bench/profile_step.py                  # bf16, 2 threads, default model
    python bench/profile_step.py --batch 32 --dtype float32
    python bench/profile_step.py --batch 1 --context 4000   # decode at 4,000 tokens of context

Each batch runs as many sampled requests (temperature 0.7, top_p 0.95, as bench/run.py) with
exactly 200 new tokens, and times steps 40 to 160, when every sequence decodes. The parts are
timed by wrapping the model's functions with perf_counter on the engine thread: wall time,
nested parts inside "forward" excluded from its own line. Where the decoder layers run in one kernel
call a step (parley/kernels/stack.py), the parts are timed with the layers called one by one, as
they are elsewhere, and the last column is the step as served, in one call. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import time
from collections import defaultdict

import torch

FIRST, LAST = 40, 160  # the steps timed


class Timers:
    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.on = False
        self.wall_at: dict[int, float] = {}

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - start
        return timed


def instrument(timers: Timers) -> None:
    from parley.engine import runner
    from parley.models.layers import decoder, rotary
    from parley.sampling.sampler import Sampler

    decoder.lora_linear = timers.wrap("projections", decoder.lora_linear)
    decoder.linear = timers.wrap("lm_head", decoder.linear)  # compute_logits is its only caller there
    decoder.paged_attention = timers.wrap("attention", decoder.paged_attention)
    rotary.Rope.apply = timers.wrap("rotary", rotary.Rope.apply)  # the torch path's; the kernel rotates in attention
    decoder.rms_norm = timers.wrap("norms", decoder.rms_norm)  # with the residual adds
    Sampler.__call__ = timers.wrap("sampling", Sampler.__call__)
    decoder.DecoderModel.forward = timers.wrap("forward", decoder.DecoderModel.forward)
    execute = runner.ModelRunner.execute

    def counted(self, *args, **kwargs):
        timers.steps += 1
        timers.on = FIRST <= timers.steps < LAST
        if timers.steps in (FIRST, LAST):  # on the engine thread: no polling thread beside the steps
            timers.wall_at[timers.steps] = time.perf_counter()
        return execute(self, *args, **kwargs)

    runner.ModelRunner.execute = timers.wrap("runner", counted)


async def profile(timers: Timers, batch: int, args, one_call: bool) -> dict[str, float]:
    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine
    from parley.types import GenerationRequest, SamplingParams, StoppingCriteria

    from parley.models.layers import decoder

    decoder.STACK_CALL = one_call
    timers.totals.clear()
    timers.steps, timers.on = 0, False
    # every step on --threads: a probe of fewer threads (engine/threads.py) would land in the steps timed
    engine = AsyncEngine.load(EngineConfig(dtype=args.dtype, num_threads=args.threads, adapt_threads=False))
    engine.start()
    prompt = engine.chat_template.render([{"role": "user", "content": "Tell me about the history of printing."}])
    if args.context:  # a long prompt of distinct words, cut to about that many tokens
        words = " ".join(f"word{i}" for i in range(args.context))
        prompt = engine.tokenizer.decode(engine.tokenizer.encode(words)[: args.context - 50]) + prompt

    async def one(i: int) -> None:
        request = GenerationRequest(prompt, add_special_tokens=False, seeds=[i],
                                    sampling=SamplingParams(do_sample=True, temperature=0.7, top_p=0.95),
                                    stopping=StoppingCriteria(max_new_tokens=200, min_new_tokens=200))
        async for _ in engine.generate(request):
            pass

    timers.wall_at.clear()
    await asyncio.gather(*(one(i) for i in range(batch)))
    await engine.shutdown()
    steps = LAST - FIRST
    per_step = {k: v / steps * 1000 for k, v in timers.totals.items()}
    per_step["wall"] = (timers.wall_at[LAST] - timers.wall_at[FIRST]) / steps * 1000
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=0, help="prompt tokens (default: a short chat)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    amx = "amx_tile" in open("/proc/cpuinfo").read()
    print(f"CPU: {cpu} ({'AMX' if amx else 'no AMX'}), torch {torch.__version__}, {args.dtype}, "
          f"{args.threads} threads; ms per decode step (steps {FIRST}-{LAST})")
    parts = ["projections", "lm_head", "attention", "rotary", "norms", "other model ops", "sampling",
             "engine outside the runner", "step (wall)", "step, layers in one call"]
    print("| batch | " + " | ".join(parts) + " |")
    print("|---" * (len(parts) + 1) + "|")
    timers = Timers()
    instrument(timers)
    for batch in args.batch:
        t = asyncio.run(profile(timers, batch, args, one_call=False))
        served = asyncio.run(profile(timers, batch, args, one_call=True))["wall"]
        inner = sum(t.get(k, 0.0) for k in ("projections", "lm_head", "attention", "rotary", "norms"))
        # lm_head runs in the runner, outside forward; norms include the final norm inside forward
        other_model = t["forward"] - (inner - t.get("lm_head", 0.0))
        row = [t.get("projections", 0.0), t.get("lm_head", 0.0), t.get("attention", 0.0), t.get("rotary", 0.0),
               t.get("norms", 0.0), other_model, t.get("sampling", 0.0), t["wall"] - t["runner"], t["wall"], served]
        print(f"| {batch} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
