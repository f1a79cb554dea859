"""The answers `previous_response_id` and GET /v1/responses/{id} refer to: the last CAPACITY stored
ones, in memory (a restart forgets them); the oldest go first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

CAPACITY = 1000


@dataclass
class Stored:
    response: dict  # the Response object as answered
    history: list[dict]  # the conversation so far as chat messages, its output included (no instructions)


class ResponseStore:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, stored: Stored) -> None:
        self._items[stored.response["id"]] = stored
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None
