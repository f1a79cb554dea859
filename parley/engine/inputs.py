"""What the runner needs besides the schedule: each sampling sequence's sampling row and the tokens
it may take (grammars and a thinking model's rules), as one [B, V] mask."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from parley.engine.request import RequestState, SequenceState
from parley.engine.sequence import Sequence
from parley.sampling.metadata import SamplingRow
from parley.structured import allocate_bitmask, bitmask_to_bool, fill_bitmasks


class StepInputs:
    def __init__(self, states: dict[int, SequenceState], vocab_size: int, model_eos_ids: frozenset[int],
                 device: torch.device):
        self.states = states
        self.vocab_size = vocab_size
        self.model_eos_ids = model_eos_ids
        self.device = device
        # Fills grammar bitmasks while the forward runs (llguidance only: no torch op off the engine thread).
        self.grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="parley-grammar")

    def sampling_row(self, seq: Sequence, drafted: list[int] | tuple = ()) -> SamplingRow:
        """`drafted`: the row of a draft position, after these draft tokens, taken as output (if they
        are not kept, the position's token is not either)."""
        req: RequestState = seq.group
        state = self.states[seq.seq_id]
        params, stopping = req.request.sampling, req.request.stopping
        needs_history = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        output = seq.output_ids + list(drafted) if needs_history or params.watermark else []
        suppressed = ()
        if seq.num_output_tokens + len(drafted) < stopping.min_new_tokens:
            suppressed = tuple(self.model_eos_ids.union(stopping.extra_eos_token_ids))
        # the watermark's green list follows the previous token: the prompt's last before any output
        needs_prompt = needs_history or (params.watermark and not output)
        return SamplingRow(
            params=params,
            generator=state.generator,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens] if needs_prompt else [],
            output_ids=output,
            suppressed_ids=suppressed,
        )

    def allowed_tokens(self, sampling: list[Sequence], drafting: list[tuple[Sequence, list[int]]] = ()
                       ) -> tuple[Callable[[], torch.Tensor] | None, Callable[[], torch.Tensor] | None, Future | None]:
        """The allowed tokens of the sampling rows, and of the rows of the drafting sequences' positions
        (runner.execute's verify_rows: one row before each of its drafts and one after them), as
        functions giving [B, V] bools once the forward has run (None: no row constrained), and the
        future of the grammar bitmask being filled meanwhile on the grammar thread. A thinking
        sequence's grammar waits for its answer; its own rules (a forced close, whether it may open
        a thinking) edit its row (drafts.verifies_exactly keeps a thinking sequence with a grammar
        from drafting)."""
        states = [self.states[seq.seq_id] for seq in sampling]
        matchers = [s.matcher if s.thinking is None or s.thinking.constrains_answer() else None for s in states]
        edits = [(row, s.thinking.mask_edit()) for row, s in enumerate(states) if s.thinking is not None]
        edits = [(row, edit) for row, edit in edits if edit is not None]
        drafters = [(self.states[seq.seq_id].matcher, drafts) for seq, drafts in drafting]
        sampled_masks = any(m is not None for m in matchers)
        draft_masks = any(m is not None for m, _ in drafters)
        filled = bitmask = None
        if sampled_masks or draft_masks:
            bitmask = allocate_bitmask(len(matchers) + sum(len(drafts) + 1 for _, drafts in drafters), self.vocab_size)
            filled = self.grammar_thread.submit(_fill, matchers, drafters, bitmask)

        def allowed() -> torch.Tensor:
            if sampled_masks:
                filled.result()
                mask = bitmask_to_bool(bitmask[: len(matchers)], self.vocab_size)
            else:
                mask = torch.ones(len(matchers), self.vocab_size, dtype=torch.bool)
            for row, (kind, token) in edits:
                if kind == "only":
                    mask[row] = False
                mask[row, token] = kind != "not"
            return mask.to(self.device)

        def draft_allowed() -> torch.Tensor:
            filled.result()
            return bitmask_to_bool(bitmask[len(matchers) :], self.vocab_size).to(self.device)

        return (allowed if sampled_masks or edits else None), (draft_allowed if draft_masks else None), filled


def _fill(matchers: list, drafters: list, bitmask: torch.Tensor) -> None:
    """On the grammar thread: the sampling rows' masks, then each drafting sequence's rows."""
    fill_bitmasks(matchers, bitmask[: len(matchers)])
    rows, at = bitmask.numpy(), len(matchers)
    for matcher, drafts in drafters:
        if matcher is not None:
            matcher.fill_draft_rows(drafts, rows[at : at + len(drafts) + 1])
        at += len(drafts) + 1
