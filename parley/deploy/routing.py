"""What prefix-aware routing knows: a request's prompt text, and which replica last served each
prefix of it.

The text is read from the body of any generation route without validating it (the replica does
that): TGI's `inputs`, completions' `prompt`, chat's `messages`, Anthropic's `system` + `messages`,
the Responses API's `instructions` + `input`. It only has to start the same way whenever two
requests' prompts do; a wrong guess costs a prefix-cache miss, never a wrong answer.

The table hashes the text in blocks of `block_chars`, each hash chained on the one before (as
the engine's block manager hashes token blocks), so a replica holding block i held the whole
prefix up to it. It forgets the least recently used blocks past `capacity`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Hashable, Iterable

import orjson

PROMPT_FIELDS = ("system", "instructions", "messages", "inputs", "prompt", "input")


def prompt_text(body: bytes) -> str:
    """The prompt text of a JSON request body, in prompt order; "" when there is none."""
    try:
        payload = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(payload, dict):
        return ""
    return "".join(_text(payload[name]) for name in PROMPT_FIELDS if name in payload)


def _text(value) -> str:
    """The strings in a field, depth first: message contents, content parts' text, prompt lists."""
    if isinstance(value, str):
        return value + "\n"
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        return "".join(_text(value[key]) for key in ("role", "content", "text", "input") if key in value)
    return ""


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """One chained hash per whole block of `text` (a partial last block is not shared)."""
    hashes, previous = [], b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + text[start:start + block_chars].encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixTable:
    def __init__(self, block_chars: int = 64, capacity: int = 200_000):
        if block_chars < 1 or capacity < 1:
            raise ValueError(f"block_chars and capacity must be positive, not {block_chars} and {capacity}")
        self.block_chars = block_chars
        self.capacity = capacity
        self._holders: OrderedDict[bytes, set] = OrderedDict()  # block hash -> replicas that served it

    def record(self, text: str, replica: Hashable) -> None:
        for h in block_hashes(text, self.block_chars):
            self._holders.setdefault(h, set()).add(replica)
            self._holders.move_to_end(h)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def matched_chars(self, text: str, replicas: Iterable[Hashable]) -> dict:
        """For each of `replicas` that served a prefix of `text`: how many characters of it."""
        wanted, matched = set(replicas), {}
        for i, h in enumerate(block_hashes(text, self.block_chars)):
            holders = self._holders.get(h)
            if not holders:
                break
            for replica in holders & wanted:
                matched[replica] = (i + 1) * self.block_chars
        return matched

    def forget(self, replica: Hashable) -> None:
        """A replica that died took its prefix cache with it."""
        for h in [h for h, holders in self._holders.items() if replica in holders]:
            holders = self._holders[h]
            holders.discard(replica)
            if not holders:
                del self._holders[h]

    def __len__(self) -> int:
        return len(self._holders)


def rank_replicas(loads: dict, matched: dict, min_prefix_chars: int, imbalance: int) -> list[list]:
    """Ranks for Ray's router, most preferred first, from each candidate's ongoing requests
    (`loads`) and the characters of this prompt it served before (`matched`).

    The replica that served the longest prefix (at least `min_prefix_chars`) comes first alone,
    unless it runs more than `imbalance` requests above the least loaded; then every replica by
    load, least loaded first (Ray takes, within a rank, the one whose queue is shortest now)."""
    by_load = sorted(loads, key=lambda r: loads[r])
    if not by_load:
        return []
    least = loads[by_load[0]]
    holders = [r for r in by_load if matched.get(r, 0) >= min_prefix_chars and loads[r] <= least + imbalance]
    if holders:
        best = max(holders, key=lambda r: matched[r])  # by_load order breaks ties: the less loaded
        return [[best], [r for r in by_load if r != best]]
    lightest = [r for r in by_load if loads[r] == least]
    return [lightest, [r for r in by_load if loads[r] != least]]
