"""One generated sequence: its tokens, how many of them have K/V in the cache, and its blocks."""

from __future__ import annotations

import enum
import itertools

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids are prompt + output. The scheduler only reasons about `num_computed_tokens`:
    a sequence needs `len(token_ids) - num_computed_tokens` more tokens through the model, which is
    the whole prompt on arrival, 1 while decoding, and everything again after a preemption."""

    def __init__(self, prompt_ids: list[int], *, group=None, index: int = 0, cache_salt: int = 0,
                 lora_id: int = 0, needs_prompt_logprobs: bool = False, prompt_top_n: int = 0, user: str | None = None):
        self.seq_id = next(_ids)
        self.group = group  # the request this sequence belongs to (opaque to the scheduler)
        self.index = index  # position among the request's sequences
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []  # NULL_BLOCK where a sliding window released the block
        self.window_table: list[int] = []  # the sliding layers' own, where other layers see everything
        self.block_hashes: list[int] = []  # the prefix-cache hash of each full computed block
        self.status = SequenceStatus.WAITING
        self.cache_salt = cache_salt  # prefix-cache namespace (e.g. the LoRA adapter)
        self.lora_id = lora_id  # the LoRA adapter it runs with; 0: the base model
        self.user = user  # whom its request is for (the scheduler admits users by turns); None: anyone
        self.needs_prompt_logprobs = needs_prompt_logprobs
        self.prompt_top_n = prompt_top_n  # with needs_prompt_logprobs: alternatives reported at each prompt token
        # with needs_prompt_logprobs: the logprobs (token p + 1's at p) and alternatives of the tokens
        # the prefix cache gave (block_manager.allocate_cached_prefix)
        self.cached_prompt_logprobs: tuple[list, list] = ([], [])
        self.spec_tokens: list[int] = []  # draft tokens to verify after the next token, if any
        self.num_cached_tokens: int | None = None  # prompt tokens the prefix cache held at its first admission

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")
