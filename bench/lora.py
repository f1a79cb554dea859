"""What serving LoRA adapters costs: engine output tokens/s at concurrency 32 for the base model
alone, for requests spread over 4 adapters, and for base + 4 adapters mixed, in one run.

    python bench/lora.py                      # default model, bf16, 2 threads, rank 16 on every projection
    python bench/lora.py --rank 8 --threads 1 --rounds 3

The same greedy prompts in every wave, one per request, every answer exactly --max-tokens long
(min_tokens), so the waves do the same work but for the adapters. Waves alternate over --rounds; each
mode reports its median tok/s and the median of its ratio to the base-only wave of the same round.
The adapters are random PEFT folders written here (all seven projections targeted). In bfloat16 on a
CPU with AVX512-BF16 LoRA runs in parley/kernels/_lora.c; elsewhere (or --dtype float32) on stacked
torch matmuls. On a 2-core machine, --threads 1 leaves a core to the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from run import USER_PROMPTS, Sample, run_wave

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NUM_ADAPTERS = 4


def write_random_adapter(path: Path, model_config, rank: int, seed: int) -> str:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) with random weights."""
    from parley.adapters.lora import module_shapes

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_config.num_layers):
        for module, (in_features, out_features) in module_shapes(model_config).items():
            key = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = 0.01 * torch.randn(rank, in_features, generator=generator)
            tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(out_features, rank, generator=generator)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}))
    return str(path)


async def bench(args) -> None:
    from parley.config import EngineConfig
    from parley.engine.async_engine import AsyncEngine
    from parley.types import GenerationRequest, StoppingCriteria, TokenEvent

    engine = AsyncEngine.load(EngineConfig(model_id=args.model_id, dtype=args.dtype, num_threads=args.threads,
                                           max_lora_rank=max(64, args.rank)))
    if args.stacked:
        engine.core.runner.lora.segmented = False  # before any step uses an adapter
    engine.start()
    names = [f"adapter{i}" for i in range(NUM_ADAPTERS)]
    with tempfile.TemporaryDirectory(prefix="parley-lora-bench-") as folder:
        for i, name in enumerate(names):
            path = write_random_adapter(Path(folder) / name, engine.model_config, args.rank, i)
            await engine.load_adapter(name, path)
    # A prompt of its own per request: with 8 shared prompts, base-only requests reused each other's
    # prefill from the prefix cache while base + 4 adapters (a cache per adapter) could not.
    prompts = [engine.chat_template.render([{"role": "user", "content": f"{USER_PROMPTS[i % len(USER_PROMPTS)]} "
                                                                          f"(request {i})"}])
               for i in range(args.concurrency * args.requests_per_client)]
    modes = {
        "base only": lambda i: None,
        f"{NUM_ADAPTERS} adapters": lambda i: names[i % NUM_ADAPTERS],
        f"base + {NUM_ADAPTERS} adapters": lambda i: ([None] + names)[i % (NUM_ADAPTERS + 1)],
    }

    def one_for(adapter_of):
        async def one(i: int) -> Sample:
            request = GenerationRequest(prompts[i % len(prompts)], add_special_tokens=False, adapter_id=adapter_of(i),
                                        stopping=StoppingCriteria(max_new_tokens=args.max_tokens,
                                                                  min_new_tokens=args.max_tokens))
            tokens = 0
            async for event in engine.generate(request):
                tokens += isinstance(event, TokenEvent)
            return Sample(0.0, [], tokens)
        return one

    for adapter_of in modes.values():  # warm-up: every path, every adapter set's stacks
        await asyncio.gather(*(one_for(adapter_of)(i) for i in range(NUM_ADAPTERS + 1)))
    step_times = time_full_decode_steps(engine.core.runner, args.concurrency)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    steps: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, adapter_of in modes.items():
            step_times.clear()
            samples, wall, _ = await run_wave(one_for(adapter_of), args.concurrency, args.requests_per_client)
            rates[mode].append(sum(s.tokens for s in samples) / wall)
            steps[mode].append(statistics.median(step_times))
    await engine.shutdown()

    base = rates["base only"]
    print(f"model={args.model_id or 'SmolLM2-135M-Instruct Q4_1 (default)'} dtype={args.dtype} threads={args.threads} "
          f"concurrency={args.concurrency} max_tokens={args.max_tokens} rank={args.rank} rounds={args.rounds} "
          f"lora={'stacked' if not engine.core.runner.lora.segmented else 'kernel'} cpus={os.cpu_count()}")
    # The machine's speed drifts between rounds more than LoRA costs, so each mode is compared with
    # the base-only wave of its own round (they ran back to back) and those ratios' median is shown.
    print("| mode                 | tok/s (median) | each round          | vs base only (median of rounds) "
          f"| full decode step ({args.concurrency} rows) |")
    print("|----------------------|----------------|---------------------|---------------------------------"
          "|-------------------------|")
    for mode, values in rates.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        ratios = [v / b for v, b in zip(values, base)]
        each = " ".join(f"{r:.0%}" for r in ratios)
        print(f"| {mode:20} | {statistics.median(values):14.1f} | {rounds:19} | "
              f"{statistics.median(ratios):4.0%} ({each}) | {statistics.median(steps[mode]) * 1e3:20.1f} ms |")


def time_full_decode_steps(runner, rows: int) -> list[float]:
    """Collects the wall time of each engine step that decodes `rows` sequences and prefills none:
    what LoRA adds to a step, apart from prefill and the arrivals' ramp."""
    times: list[float] = []
    execute = runner.execute

    def timed(sched, *args, **kwargs):
        started = time.perf_counter()
        result = execute(sched, *args, **kwargs)
        if not sched.prefills and len(sched.decodes) == rows:
            times.append(time.perf_counter() - started)
        return result

    runner.execute = timed
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stacked", action="store_true", help="the torch path even where the kernel runs")
    args = parser.parse_args()
    started = time.perf_counter()
    asyncio.run(bench(args))
    print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
