"""LoRA adapters over HTTP: --lora-adapters, the admin routes, selection in every dialect, listings, metrics."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from server import CLIENT_TIMEOUT_S, ServerProcess
from tiny_lora import make_lora_adapter
from tiny_model import make_tiny_model

API_KEY = "lora-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "Once upon a time there was a little robot who"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_routes")
    model = make_tiny_model(str(root / "model"), seed=0)
    adapters = {name: make_lora_adapter(model, root / name, r=4, alpha=8, seed=seed)
                for seed, name in enumerate(("a", "b", "c"), start=1)}
    adapters["big"] = make_lora_adapter(model, root / "big", r=16, alpha=16)
    adapters["lm_head"] = make_lora_adapter(model, root / "lm_head", targets=("q_proj", "lm_head"))
    pickle_only = root / "pickle_only"
    shutil.copytree(adapters["b"], pickle_only)
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    adapters["pickle_only"] = str(pickle_only)
    return model, adapters


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    model, adapters = files
    proc = ServerProcess([sys.executable, "-m", "parley", "serve", "--model-id", model, "--dtype", "float32",
                          "--num-threads", "1", "--max-total-tokens", "512", "--max-batch-total-tokens", "8192",
                          "--api-key", API_KEY, "--lora-adapters", f"a={adapters['a']}", "--max-lora-rank", "8",
                          "--lora-root", str(Path(model).parent)],
                         tmp_path_factory.mktemp("lora_server") / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S, headers=AUTH) as client:
        yield client


def generate(http, adapter_id=None, max_new_tokens=8) -> httpx.Response:
    return http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": max_new_tokens, "adapter_id": adapter_id, "decoder_input_details": False}})


def completion(http, model, max_tokens=8, path="/v1/completions") -> str:
    r = http.post(path, json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens,
                              "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def chat(http, model, path="/v1/chat/completions") -> str:
    r = http.post(path, json={"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                              "min_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def load(http, name, path) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def unload(http, name) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_startup_adapter_is_listed_in_models_and_info(http, files):
    model, adapters = files
    data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [model, "a"]
    assert data[1]["parent"] == model and data[1]["root"] == adapters["a"] and data[1]["object"] == "model"
    assert http.get("/info").json()["lora_adapters"] == [{"name": "a", "path": adapters["a"], "rank": 4}]


def test_admin_routes_need_the_api_key(server, files):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": files[1]["b"]})
    assert r.status_code == 401
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 401


def test_every_dialect_selects_the_adapter(http, files):
    model, adapters = files
    assert load(http, "b", adapters["b"]).status_code == 200
    try:
        tgi = generate(http, "b").json()["generated_text"]
        assert tgi != generate(http).json()["generated_text"]
        assert completion(http, "b") == tgi  # OpenAI `model` naming the adapter
        assert completion(http, "dummy") == generate(http).json()["generated_text"]  # any other name: base
        assert completion(http, model) == completion(http, "dummy")
        with_adapter = chat(http, "b")
        assert with_adapter != chat(http, "tgi")
        assert chat(http, "endpoint-id:b", path="/dedicated/v1/chat/completions") == with_adapter  # Friendli
        assert chat(http, "endpoint-id", path="/dedicated/v1/chat/completions") == chat(http, "tgi")
        assert "b" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    finally:
        assert unload(http, "b").status_code == 200
    r = generate(http, "b")
    assert r.status_code == 404 and "'b'" in r.json()["error"]
    assert "b" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("pickle_only", "adapter_model.bin, a pickle"),
    ("lm_head", "unsupported target module.*lm_head"),
    ("big", "rank 16 .* exceeds the maximum LoRA rank 8"),
])
def test_unloadable_adapters_are_422_saying_why(http, files, case, message):
    path = files[1].get(case, "nonexistent")  # relative paths are under --lora-root
    r = load(http, "bad", path)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "lora_path" and re.search(message, error["message"]), error
    assert "bad" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_names_taken_or_missing_are_422(http, files):
    model, adapters = files
    for name, message in ((model, "base model's name"), ("a", "already loaded")):
        r = load(http, name, adapters["b"])
        assert r.status_code == 422 and message in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "lora_name"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 422


def test_unknown_adapters_are_404_naming_them(http):
    r = generate(http, "nope")
    assert r.status_code == 404 and "'nope'" in r.json()["error"] and r.json()["error_type"] == "not_found"
    r = unload(http, "nope")
    assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]


def test_requests_per_adapter_are_counted(http):
    generate(http, "a", max_new_tokens=2)
    metrics = http.get("/metrics").text
    line = next(line for line in metrics.splitlines() if line.startswith('parley_adapter_requests_total{adapter="a"}'))
    assert float(line.split()[-1]) >= 1


def test_unloading_mid_stream_lets_the_stream_finish(http, files):
    assert load(http, "c", files[1]["c"]).status_code == 200
    expected = completion(http, "c", max_tokens=400)
    body = {"model": "c", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    texts, unloaded = [], False
    with http.stream("POST", "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            texts += [c["text"] for c in chunk["choices"]]
            if not unloaded:  # the request is running: unload its adapter
                unloaded = True
                r = unload(http, "c")
                assert r.status_code == 200 and "running requests finish with it first" in r.text
                assert generate(http, "c").status_code == 404
            usage = chunk.get("usage")
    assert usage["completion_tokens"] == 400 and "".join(texts) == expected


def test_lora_flags_and_environment(monkeypatch):
    from parley.cli import build_parser, configs

    monkeypatch.setenv("LORA_ADAPTERS", "env=/adapters/env")
    monkeypatch.setenv("MAX_LORA_RANK", "32")
    engine, _ = configs(build_parser().parse_args(["serve"]))
    assert engine.lora_adapters == (("env", "/adapters/env"),) and engine.max_lora_rank == 32
    engine, _ = configs(build_parser().parse_args(
        ["serve", "--lora-adapters", "a=/adapters/a, org/b ,c=/x=y", "--max-lora-rank", "8"]))
    assert engine.lora_adapters == (("a", "/adapters/a"), ("org/b", "org/b"), ("c", "/x=y"))
    assert engine.max_lora_rank == 8


def test_adapters_load_only_from_under_the_lora_root(http, files, tmp_path):
    model, adapters = files
    outside = shutil.copytree(adapters["b"], tmp_path / "outside")
    link = Path(model).parent / "link_out"
    link.symlink_to(outside)
    try:
        for path in (str(outside), "../" + outside.name, str(link), "link_out"):
            r = load(http, "escape", path)
            assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path", (path, r.text)
        assert load(http, "relative", "c").status_code == 200  # relative to the root
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "relative"}).status_code == 200
    finally:
        link.unlink()
