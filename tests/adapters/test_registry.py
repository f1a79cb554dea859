"""Adapter names, lookups and the drain on unload: no request loses its adapter mid-way."""

import pytest
import torch

from parley.adapters.lora import AdapterError, LoRAWeights, ModuleWeights
from parley.adapters.registry import LoRARegistry
from parley.types import NotFoundError


def weights(name: str) -> LoRAWeights:
    module = ModuleWeights(torch.zeros(1, 2, 4), torch.zeros(1, 4, 2))
    return LoRAWeights(name, f"/adapters/{name}", 2, {"o_proj": module})


def test_names_must_be_new_and_not_the_base_model():
    registry = LoRARegistry(base_name="base")
    registry.add(weights("a"))
    for name, match in (("base", "base model's name"), ("a", "already loaded"), ("", "non-empty")):
        with pytest.raises(AdapterError, match=match) as info:
            registry.add(weights(name))
        assert info.value.field == "lora_name"


def test_lookup_of_an_unknown_adapter_names_it_and_the_loaded_ones():
    registry = LoRARegistry(base_name="base")
    registry.add(weights("a"))
    assert registry.lookup("a").weights.path == "/adapters/a"
    with pytest.raises(NotFoundError, match="adapter 'nope' is not loaded.*loaded adapters: a"):
        registry.lookup("nope")


def test_each_load_gets_its_own_id_and_cache_salt():
    registry = LoRARegistry(base_name="base")
    first, other = registry.add(weights("a")), registry.add(weights("b"))
    registry.remove("a")
    again = registry.add(weights("a"))
    ids = {first.lora_id, other.lora_id, again.lora_id}
    salts = {first.cache_salt, other.cache_salt, again.cache_salt}
    assert len(ids) == 3 and 0 not in ids and len(salts) == 3 and 0 not in salts


def test_unloading_an_adapter_in_use_drops_it_after_its_last_request():
    registry = LoRARegistry(base_name="base")
    adapter = registry.add(weights("a"))
    assert registry.acquire(adapter.lora_id) and registry.acquire(adapter.lora_id)
    assert registry.remove("a") == 2
    with pytest.raises(NotFoundError):
        registry.lookup("a")
    assert not registry.acquire(adapter.lora_id)  # a request admitted after the unload is refused
    generation = registry.generation
    registry.release(adapter.lora_id)
    assert registry.weights(adapter.lora_id).name == "a"  # the running request still has it
    registry.release(adapter.lora_id)
    assert registry.generation == generation + 1
    with pytest.raises(KeyError):
        registry.weights(adapter.lora_id)


def test_unloading_an_unknown_adapter_is_not_found():
    with pytest.raises(NotFoundError, match="'a'"):
        LoRARegistry(base_name="base").remove("a")
