"""The HTTP layer asks an engine only what `parley.types.Engine` declares: the real engine and the
API tests' fake both are one, method for method."""

from __future__ import annotations

import inspect

import pytest
from fake_engine import FakeEngine

from parley.config import EngineConfig
from parley.engine.async_engine import AsyncEngine
from parley.types import Engine

METHODS = [name for name, member in vars(Engine).items() if inspect.isfunction(member) and not name.startswith("_")]


def parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("engine_class", [AsyncEngine, FakeEngine])
def test_every_method_of_the_interface_has_its_signature(engine_class):
    assert {"render", "tokenize", "generate", "stats", "token_bytes"} <= set(METHODS)
    for name in METHODS:
        method = getattr(engine_class, name)
        assert parameters(method) == parameters(getattr(Engine, name)), name
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(getattr(Engine, name)), name


def test_the_fake_engine_is_an_engine():
    assert isinstance(FakeEngine(EngineConfig()), Engine)  # `info` and `failure` included
    assert isinstance(AsyncEngine.failure, property) and "self.info = EngineInfo(" in inspect.getsource(AsyncEngine)
