"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and samples.

The only engine file that touches torch, the model and the sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parley.adapters.batch import LoRABatcher
from parley.config import ModelConfig
from parley.engine.block_manager import KVLayout
from parley.engine.scheduler import ScheduledSequence, SchedulerOutput
from parley.engine.sequence import Sequence
from parley.models.attention import AttentionMetadata, PrefillChunk, kv_cache_shape, table_width
from parley.sampling.metadata import SamplingRow
from parley.sampling.sampler import Sampler, SamplerOutput, prompt_logprobs, skip_draws


@dataclass
class StepResult:
    sampled: SamplerOutput | None  # one row per sampling sequence without drafts, in schedule order
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> logprobs of prompt tokens
    prompt_top: dict[int, list[tuple[list[int], list[float]]]] = field(default_factory=dict)  # their alternatives
    verified: dict[int, SamplerOutput] = field(default_factory=dict)  # seq_id -> accepted drafts + the next token


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, sampler: Sampler, *,
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 lora: LoRABatcher | None = None, layout: KVLayout = KVLayout()):
        self.model = model
        self.sampler = sampler
        self.lora = lora
        self.block_size = block_size
        self.device = device
        self.layout = layout
        self.kv_caches = []
        for i in range(config.num_layers):  # a split layout's sliding layers: their own, smaller pool
            blocks = layout.window_blocks if layout.split and config.window(i) is not None else num_blocks
            shape = kv_cache_shape(blocks, block_size, config.num_kv_heads, config.head_dim)
            self.kv_caches.append((torch.zeros(shape, dtype=dtype, device=device),
                                   torch.zeros(shape, dtype=dtype, device=device)))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, rows: list[SamplingRow], verify_rows: list[list[SamplingRow]],
                allowed: Callable[[], torch.Tensor] | None = None,
                verify_allowed: Callable[[], torch.Tensor] | None = None) -> StepResult:
        """`rows` holds the sampling state of every scheduled sequence that samples without drafts,
        in schedule order, and `verify_rows` that of every sequence with draft tokens, one row for
        each of its draft positions and one for the token after them. `allowed` and `verify_allowed`
        give their grammar masks [B, V] (True = allowed), asked for only after the forward: they may
        be computed meanwhile."""
        input_ids, positions = [], []
        token_loras = []  # the LoRA adapter of each token (0: base model)
        sample_index = []  # flat-batch index of each sampling sequence's last token
        verify_spans = []  # (scheduled sequence, flat index of its last real token)
        for s in sched.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + s.num_new_tokens - len(s.spec_tokens)])
            if s.spec_tokens:
                verify_spans.append((s, len(input_ids) - 1))
                input_ids.extend(s.spec_tokens)
            elif s.samples:
                sample_index.append(len(input_ids) - 1)
            positions.extend(range(start, start + s.num_new_tokens))
            token_loras.extend([seq.lora_id] * s.num_new_tokens)

        meta = self._attention_metadata(sched, lambda seq: seq.block_table)
        if self.layout.split:
            meta.window_meta = self._attention_metadata(sched, lambda seq: seq.window_table)
        chunks = meta.prefill_chunks

        lora = self.lora.batch(token_loras) if self.lora is not None else None
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta, lora)

        result = StepResult(sampled=None)
        for s, chunk in zip(sched.prefills, chunks):
            if s.seq.needs_prompt_logprobs:
                result.prompt_logprobs[s.seq.seq_id], top = self._prompt_logprobs(s, chunk, hidden)
                if top:
                    result.prompt_top[s.seq.seq_id] = top
        if sample_index:
            logits = self.model.compute_logits(hidden[self._tensor(sample_index)])
            result.sampled = self.sampler(logits, rows, allowed() if allowed is not None else None, owned=True)
        if verify_spans:
            result.verified = self._verify(verify_spans, verify_rows, hidden, verify_allowed)
        return result

    def _verify(self, spans: list[tuple[ScheduledSequence, int]], rows: list[list[SamplingRow]],
                hidden: torch.Tensor, allowed: Callable[[], torch.Tensor] | None) -> dict[int, SamplerOutput]:
        """For each sequence with drafts, choose a token at every draft position as plain decoding
        would there (the same sampler, the position's row, the next draws of the sequence's
        generator), keep the drafts while each is the token chosen before it, then the token chosen
        after the last one kept. The logits are bit-identical to one-token steps' (batch
        invariance), so the output is exactly plain decoding's, sampled too, provided nothing in the
        rows depends on the tokens before them (drafts.verifies_exactly). Each generator is left as
        after one draw per token kept. Every sequence's positions go through one lm_head call and one
        sampler call (a call per sequence read the lm_head's 28 MB from memory again for each). A
        grammar's mask at each position is the one after the drafts before it (inputs.allowed_tokens)."""
        index = [first + i for (_, first), seq_rows in zip(spans, rows, strict=True) for i in range(len(seq_rows))]
        states = [seq_rows[0].generator.get_state() if seq_rows[0].generator is not None else None for seq_rows in rows]
        logits = self.model.compute_logits(hidden[self._tensor(index)])
        out = self.sampler(logits, [r for seq_rows in rows for r in seq_rows], allowed() if allowed is not None else None,
                           owned=True)
        verified, start = {}, 0
        for (s, _), seq_rows, state in zip(spans, rows, states):
            drafts, chosen = s.spec_tokens, out.token_ids[start : start + len(seq_rows)]
            kept = 0
            while kept < len(drafts) and chosen[kept] == drafts[kept]:
                kept += 1
            if state is not None:
                seq_rows[0].generator.set_state(state)
                skip_draws(seq_rows[0].generator, kept + 1, self.device)
            end = start + kept + 1
            verified[s.seq.seq_id] = SamplerOutput(out.token_ids[start:end], out.logprobs[start:end],
                                                   out.top_ids[start:end], out.top_logprobs[start:end])
            start += len(seq_rows)
        return verified

    def _attention_metadata(self, sched: SchedulerOutput, table_of: Callable[[Sequence], list[int]]) -> AttentionMetadata:
        """Where the step's tokens write and read, by each sequence's table `table_of(seq)`."""
        slots, bs = [], self.block_size
        for s in sched.scheduled:
            table, start = table_of(s.seq), s.seq.num_computed_tokens
            slots.extend(table[pos // bs] * bs + pos % bs for pos in range(start, start + s.num_new_tokens))
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), num_decode_tokens=len(sched.decodes))
        if sched.decodes:
            meta.decode_block_tables, meta.decode_context_lens = self._decode_tables(sched.decodes, table_of)
        chunks, offset = [], len(sched.decodes)
        for s in sched.prefills:
            context = s.seq.num_computed_tokens + s.num_new_tokens
            blocks = -(-context // bs)
            table = table_of(s.seq)[:blocks] + [0] * (table_width(blocks, bs) - blocks)
            chunks.append(PrefillChunk(offset, s.num_new_tokens, context, self._block_ids(table)))
            offset += s.num_new_tokens
        meta.prefill_chunks = tuple(chunks)
        return meta

    def _decode_tables(self, decodes: list[ScheduledSequence], table_of: Callable[[Sequence], list[int]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        widest = table_width(max(len(table_of(s.seq)) for s in decodes), self.block_size)
        tables = self._block_ids([table_of(s.seq) + [0] * (widest - len(table_of(s.seq))) for s in decodes])
        return tables, self._tensor([len(s.seq) for s in decodes])

    def _prompt_logprobs(self, s: ScheduledSequence, chunk: PrefillChunk, hidden: torch.Tensor
                         ) -> tuple[list[float], list[tuple[list[int], list[float]]]]:
        """Logprob of each prompt token given the ones before it, for the positions in this chunk,
        and the sequence's prompt_top_n alternatives at each."""
        seq, start = s.seq, s.seq.num_computed_tokens
        end = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)  # last position predicting a prompt token
        if end <= start:
            return [], []
        logits = self.model.compute_logits(hidden[chunk.start : chunk.start + end - start])
        next_ids = self._tensor(seq.token_ids[start + 1 : end + 1])
        return prompt_logprobs(logits, next_ids, seq.prompt_top_n)

    def _block_ids(self, tables: list) -> torch.Tensor:
        """Block tables as a tensor, a released block (NULL_BLOCK, before a window) as block 0: the
        kernel does not read it, the torch path reads block 0's (finite) values under the window's mask."""
        ids = self._tensor(tables)
        return ids.clamp_(min=0) if self.layout.window is not None else ids

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
