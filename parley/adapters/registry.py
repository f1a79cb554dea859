"""The adapters the engine serves, by name, and which requests still use them.

Every mutation runs on the engine thread (between steps), so a step never sees an adapter vanish
under it. Other threads only read `loaded`, a dict replaced, never changed, on each load/unload.
An adapter unloaded while requests use it leaves the name table at once (new requests: 404) and
its weights are dropped when its last request ends: no request is lost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from parley.adapters.lora import AdapterError, LoRAWeights
from parley.types import NotFoundError


@dataclass
class LoadedAdapter:
    lora_id: int  # unique for the life of the process (a reload gets a new one); 0 is the base model
    weights: LoRAWeights
    cache_salt: int  # prefix-cache namespace: KV blocks are shared by no two adapters, nor two loads
    users: int = 0  # requests running with it

    @property
    def name(self) -> str:
        return self.weights.name


class LoRARegistry:
    def __init__(self, base_name: str):
        self.base_name = base_name
        self.loaded: dict[str, LoadedAdapter] = {}  # name -> adapter (any thread may read it)
        self._by_id: dict[int, LoadedAdapter] = {}  # every adapter a request may still use
        self._ids = itertools.count(1)
        self.generation = 0  # bumped whenever an adapter's weights are dropped

    # -- any thread --------------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        if not name or name != name.strip():
            raise AdapterError("adapter name must be non-empty, without surrounding spaces", "lora_name")
        if name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is the base model's name", "lora_name")
        if name in self.loaded:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first", "lora_name")

    def lookup(self, name: str) -> LoadedAdapter:
        adapter = self.loaded.get(name)
        if adapter is None:
            loaded = ", ".join(sorted(self.loaded)) or "none"
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded adapters: {loaded})")
        return adapter

    def names_by_id(self) -> dict[int, str]:
        """The name of every adapter load a request may still run with (unloaded ones too)."""
        return {lora_id: adapter.name for lora_id, adapter in dict(self._by_id).items()}

    # -- engine thread -----------------------------------------------------------------------
    def add(self, weights: LoRAWeights) -> LoadedAdapter:
        self.check_name(weights.name)
        lora_id = next(self._ids)
        adapter = LoadedAdapter(lora_id, weights, cache_salt=hash(("lora", weights.name, lora_id)))
        self._by_id[lora_id] = adapter
        self.loaded = {**self.loaded, weights.name: adapter}
        return adapter

    def remove(self, name: str) -> int:
        """Unload `name`; returns how many running requests finish with it first."""
        adapter = self.lookup(name)
        self.loaded = {n: a for n, a in self.loaded.items() if n != name}
        self._drop_if_unused(adapter)
        return adapter.users

    def acquire(self, lora_id: int) -> bool:
        """A request starts with adapter `lora_id`; False if that load is gone (unloaded meanwhile)."""
        adapter = self._by_id.get(lora_id)
        if adapter is None or self.loaded.get(adapter.name) is not adapter:
            return False
        adapter.users += 1
        return True

    def release(self, lora_id: int) -> None:
        adapter = self._by_id[lora_id]
        adapter.users -= 1
        self._drop_if_unused(adapter)

    def weights(self, lora_id: int) -> LoRAWeights:
        return self._by_id[lora_id].weights

    def has_weights(self, lora_id: int) -> bool:
        """False once the adapter's weights are dropped (unloaded, and its last request ended)."""
        return lora_id in self._by_id

    def _drop_if_unused(self, adapter: LoadedAdapter) -> None:
        if adapter.users == 0 and self.loaded.get(adapter.name) is not adapter:
            del self._by_id[adapter.lora_id]
            self.generation += 1
