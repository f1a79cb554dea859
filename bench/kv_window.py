"""KV-cache blocks a sequence holds with sliding-window layers, before and after they release the
blocks behind their window (issue 13), for a tiny Mistral-like model (every layer slides) and a tiny
Gemma-3-like one (5 sliding layers to 1 global), through the whole engine in float32.

    PYTHONPATH=. python bench/kv_window.py              # N = 1024 tokens, W = 128, blocks of 16

"before" runs the same engine with the layout of a model without windows (parley/engine/
block_manager.py's KVLayout()): the windows still apply in attention, but every block is kept.
Counts, not timings: any machine gives the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_model.py

from tiny_model import make_tiny_model, start_tiny_engine  # noqa: E402

from parley.engine import async_engine  # noqa: E402
from parley.engine.block_manager import NULL_BLOCK, KVLayout, kv_layout  # noqa: E402
from parley.types import FinalEvent, GenerationRequest, StoppingCriteria  # noqa: E402

PROMPT = "The user asked a question and the assistant gave a helpful answer. Once upon a time there was "


def models(window: int, context: int) -> dict[str, tuple[str, dict]]:
    common = {"sliding_window": window, "max_position_embeddings": context, "num_hidden_layers": 6}
    return {"Mistral-like (6 sliding layers)": ("mistral", common),
            "Gemma-3-like (5 sliding : 1 global)": ("gemma3", {**common, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]})}


async def held_blocks(path: str, tokens: int, block_size: int, before: bool) -> tuple[list[int], int, int]:
    """Blocks the sequence holds in each pool just before it finishes, the KV bytes they are, and
    the bytes of the whole cache."""
    async_engine.kv_layout = (lambda *args: KVLayout()) if before else kv_layout
    engine = start_tiny_engine(path, block_size=block_size, max_total_tokens=tokens + 64,
                               max_batch_total_tokens=4 * (tokens + 64), max_batch_size=8)
    blocks, runner = engine.core.scheduler.blocks, engine.core.runner
    seen = []
    free = blocks.free_sequence

    def record(seq):
        seen.append([len(t) - t.count(NULL_BLOCK) for t in blocks._tables(seq)])
        free(seq)

    blocks.free_sequence = record
    try:
        prompt_len = len(engine.tokenizer.encode(PROMPT))
        new = tokens - prompt_len
        request = GenerationRequest(PROMPT, stopping=StoppingCriteria(max_new_tokens=new, min_new_tokens=new))
        async for event in engine.generate(request):
            if isinstance(event, FinalEvent):
                break
        # bytes of one block in one layer (K and V), and which pool each layer's cache is in
        per_layer = [k.numel() // k.shape[1] * k.element_size() * 2 for k, _ in runner.kv_caches]
        config = engine.model_config
        pool_of = [1 if blocks.layout.split and config.window(i) is not None else 0 for i in range(config.num_layers)]
        held_bytes = sum(seen[0][pool_of[i]] * per_layer[i] for i in range(config.num_layers))
        return seen[0], held_bytes, runner.kv_cache_bytes
    finally:
        engine.core.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"sequence of {args.tokens} tokens, window {args.window}, blocks of {args.block_size} tokens, max 8 sequences")
    print("| model | layout | blocks held (main / sliding pool) | KV held by the sequence | KV cache allocated |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, overrides) in models(args.window, args.tokens + 64).items():
            path = make_tiny_model(Path(tmp) / arch, arch, **overrides)
            for before in (True, False):
                held, held_bytes, cache_bytes = asyncio.run(held_blocks(path, args.tokens, args.block_size, before))
                print(f"| {name} | {'before' if before else 'after'} | {' / '.join(map(str, held))} | "
                      f"{held_bytes / 2**10:.0f} KiB | {cache_bytes / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
