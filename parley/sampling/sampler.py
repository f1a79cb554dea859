"""Choose the next token of every sequence in a mixed batch, each with its own parameters.

Order of processing, on logits [B, V]:
 1. grammar mask (`allowed`) and the rows' suppressed ids -> -inf
 2. logit_bias (added)
 3. repetition_penalty over the prompt+output ids (HF/TGI: positive logits divided, others multiplied)
 4. frequency/presence penalty over the output ids (OpenAI: -= frequency*count + presence*(count>0))
 5. watermark (Kirchenbauer et al. 2023): +delta on a green list of gamma*vocab_size ids drawn from
    a generator seeded with key * previous token id
 6. logprobs: log_softmax of these logits, reported for the chosen token and the top-n
 7. greedy rows: argmax. Rows with do_sample: temperature, top_k, top_p, typical_p, min_p, then a
    draw from the row's generator. On CPUs with AVX512-BF16 the sampling kernel does this for every
    sampled row but typical_p's, in one call (parley/kernels/_sample.c: ~40 us a row where these
    torch ops took ~0.5 ms); which path a row takes depends on its own parameters only.

A step that no row uses is skipped, and a step that some rows use runs on those rows only.

Batch invariance: a row gets bit-identical results whatever else is in the batch and at whatever
position. Every op used works row by row (elementwise, softmax, cumsum, topk values, argmax, amax);
float sum() is avoided because it splits long rows across threads when the batch is small. The draw
takes one uniform from the row's generator and inverts the row's CDF in token-id order, so it does
not depend on how a sort orders tied logits either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parley.kernels import sample as sample_kernel
from parley.sampling import filters
from parley.sampling.metadata import DrawnRows, SampledRows, SamplingBatch, SamplingRow

_PROMPT_CHUNK = 256  # rows of prompt logits turned into logprobs at once
_HUGE = 1e30  # bound of a penalized logit: dominant, and finite even divided by MIN_TEMPERATURE


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of the chosen token
    top_ids: list[list[int]]  # per row, the params.top_n_tokens most likely ids (empty if 0)
    top_logprobs: list[list[float]]


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device,
        watermark_gamma: float = 0.5,
        watermark_delta: float = 2.0,
        watermark_key: int = 15485863,
    ):
        self.vocab_size = vocab_size  # the id space of the watermark's green lists
        self.device = torch.device(device)
        self.watermark_gamma = watermark_gamma
        self.watermark_delta = watermark_delta
        self.watermark_key = watermark_key
        self.kernel = sample_kernel.available(self.device)  # draws the sampled rows but typical_p's

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        rows: list[SamplingRow],
        allowed: torch.Tensor | None = None,  # [B, V] bool grammar mask, True = allowed
        owned: bool = False,  # the caller will not read `logits` again: edited in place, not copied
    ) -> SamplerOutput:
        batch = SamplingBatch.build(rows, logits.shape[-1], self.device, kernel=self.kernel)
        x = self._process(logits, batch, allowed, owned)
        logprobs = x.log_softmax(-1)
        token_ids = self._choose(x, batch)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)

        top_ids: list[list[int]] = [[] for _ in rows]
        top_logprobs: list[list[float]] = [[] for _ in rows]
        for n, at in batch.top_n.items():
            values, ids = logprobs.index_select(0, at).topk(n)
            for row, row_ids, row_values in zip(at.tolist(), ids.tolist(), values.tolist()):
                top_ids[row], top_logprobs[row] = row_ids, row_values
        return SamplerOutput(token_ids.tolist(), chosen.tolist(), top_ids, top_logprobs)

    def greenlist(self, previous_id: int) -> torch.Tensor:
        """The watermark's green token ids after `previous_id` (for generation and detection)."""
        generator = torch.Generator().manual_seed(self.watermark_key * previous_id)
        size = int(self.watermark_gamma * self.vocab_size)
        return torch.randperm(self.vocab_size, generator=generator)[:size].to(self.device)

    def _process(self, logits, batch: SamplingBatch, allowed, owned: bool) -> torch.Tensor:
        """Steps 1-5, on a copy when anything changes (but where the logits are `owned`: at 32 rows
        the copy was ~0.2 ms, a tenth of the sampler)."""
        x = logits if allowed is None else torch.where(allowed, logits, -math.inf)
        if not batch.edits_logits:
            return x
        if x is logits and not owned:
            x = x.clone()
        if t := batch.suppressed:
            x.index_put_((t.rows, t.ids), t.values)
        if t := batch.logit_bias:
            x[t.rows, t.ids] += t.values
        if t := batch.repetition:
            seen = x[t.rows, t.ids]
            # clamped: a penalty of 1e-300 made logits infinite, and softmax NaN
            x[t.rows, t.ids] = torch.where(seen > 0, seen / t.values, seen * t.values).clamp_(-_HUGE, _HUGE)
        if t := batch.frequency:
            x[t.rows, t.ids] -= t.values
        for row, previous_id in batch.watermark:
            x[row, self.greenlist(previous_id)] += self.watermark_delta
        return x

    def _choose(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        s, d = batch.sampled, batch.drawn
        if s is None and d is None:
            return greedy(x)
        if s is not None and s.rows is None:
            return self._sample(x, s)
        if d is not None and d.rows is None:
            return self._draw(x, d)
        token_ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        if s is not None:
            token_ids[s.rows] = self._sample(x, s)
        if d is not None:
            token_ids[d.rows] = self._draw(x, d)
        if batch.greedy_rows is not None:
            token_ids[batch.greedy_rows] = greedy(x.index_select(0, batch.greedy_rows))
        return token_ids

    def _draw(self, x: torch.Tensor, d: DrawnRows) -> torch.Tensor:
        rows = x if d.rows is None else x.index_select(0, d.rows)
        return sample_kernel.draw(rows, d.temperature, d.top_k, d.top_p, d.log_min_p, _uniforms(d.generators, x.device))

    def _sample(self, x: torch.Tensor, s: SampledRows) -> torch.Tensor:
        # A copy of the sampled rows, changed in place from here on: multi-MB allocations can cost
        # more than the arithmetic when the allocator hands their pages back to the OS each time.
        # Divided by the temperature as it is copied when every row samples (one pass, not two).
        if s.rows is None:
            x = x.clone() if s.temperature is None else x.div(s.temperature)
        else:
            x = x.index_select(0, s.rows)
            if s.temperature is not None:
                x.div_(s.temperature)
        for removed, used in (
            (filters.top_k, s.top_k),
            (filters.top_p, s.top_p),
            (filters.typical_p, s.typical_p),
            (filters.min_p, s.log_min_p),
        ):
            if used is None:
                continue
            if used.rows is None:
                x.masked_fill_(removed(x, used.values), -math.inf)
            else:
                rows = x.index_select(0, used.rows)
                rows.masked_fill_(removed(rows, used.values), -math.inf)
                x.index_copy_(0, used.rows, rows)
        # Inverse CDF in token-id order with one uniform per row from the row's own generator.
        return inverse_cdf(x.softmax(-1), _uniforms(s.generators, x.device))  # softmax, as exp() is slow on -inf


def greedy(x: torch.Tensor) -> torch.Tensor:
    """Each row's first largest id, argmax's rule, by max(): on CPU 2.6x faster than argmax (a
    [32, 49152] float32 row block: 1.01 -> 0.39 ms on two threads; one row: 63 -> 25 us)."""
    return x.max(-1).indices


def _uniforms(generators: list[torch.Generator], device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, from the row's own generator."""
    return torch.cat([_uniform(g, device) for g in generators])


def _uniform(generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(1, generator=generator, dtype=torch.float64, device=device)


def skip_draws(generator: torch.Generator, draws: int, device) -> None:
    """Advance `generator` as `draws` sampled rows would."""
    for _ in range(draws):
        _uniform(generator, device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token id at which the float64 running sum of `probs` [R, V] (in id order)
    passes u [R] times the row's total.

    The filters leave most tokens at probability 0, and adding 0 leaves a running sum as it is: so
    the sum over only the tokens left gives the same values at those tokens, and the same choice, as
    the sum over the whole vocabulary, whose cumsum was the largest part of sampling (~5 ms of a
    32-row step's ~15). The whole row is summed when many tokens are left."""
    rows, width = probs.shape
    kept = probs.nonzero()  # [N, 2], row by row, ids in order
    counts = torch.bincount(kept[:, 0], minlength=rows)
    most = int(counts.max()) if rows else 0
    if most * 4 > width:
        cdf = torch.cumsum(probs, -1, dtype=torch.float64)
        at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        return at.clamp_(max=width - 1)  # u * total rounded up to the total: the last token
    row, token = kept.unbind(1)
    column = torch.arange(len(kept), device=probs.device) - (counts.cumsum(0) - counts)[row]
    left = torch.zeros(rows, most, dtype=torch.float64, device=probs.device)
    left[row, column] = probs[row, token].double()
    ids = torch.zeros(rows, most, dtype=torch.long, device=probs.device)
    ids[row, column] = token
    cdf = left.cumsum_(-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return ids.gather(1, torch.minimum(at, (counts - 1).clamp_(min=0))[:, None]).squeeze(1)


def prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, top_n: int = 0
                    ) -> tuple[list[float], list[tuple[list[int], list[float]]]]:
    """logprob of next_ids[t] under logits[t] (the raw model logits), for decoder_input_details;
    with top_n, each row's top_n most likely (ids, logprobs) too, ordered as the sampler's top_n
    tokens. In chunks of rows, so a long prompt never needs a second [T, V] tensor."""
    c, chosen, top = _PROMPT_CHUNK, [], []
    for i in range(0, len(logits), c):
        logprobs = logits[i : i + c].float().log_softmax(-1)
        chosen += logprobs.gather(1, next_ids[i : i + c, None]).squeeze(1).tolist()
        if top_n:
            values, ids = logprobs.topk(top_n)
            top += zip(ids.tolist(), values.tolist())
    return chosen, top
