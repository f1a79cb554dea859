"""Parley on Ray Serve, on a local Ray instance: 2 replicas of a tiny random model, one CPU and one
torch thread each, behind the ingress and the prefix router (parley.deploy.ray). One instance for
the whole module; the test that kills a replica runs last."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' for the Ray Serve tests")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

from fastapi.testclient import TestClient  # noqa: E402

from parley.api import create_app  # noqa: E402
from parley.cli import load_engine  # noqa: E402
from parley.deploy.asgi import ResponseStart  # noqa: E402
from parley.deploy.ray import REPLICA_HEADER, _rest, build, parse_args  # noqa: E402
from server import CLIENT_TIMEOUT_S, free_port, metric  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402

REPO = Path(__file__).parent.parent.parent
DEADLINE_S = 300  # for anything Ray does in the background (restart a replica): the 2 cores are shared
SYSTEM_A = "You are Parley's test assistant. Answer in one short sentence, politely. " * 8
SYSTEM_B = "You translate every message into French, keeping names as they are written. " * 8
ARGS = {"dtype": "float32", "num_replicas": 2, "max_batch_total_tokens": 8192, "max_total_tokens": 4096, "served_model_name": "m",
        "max_ongoing_requests": 2, "max_queued_requests": 2, "status_interval": 0, "payload_limit": 100_000}


# -- the builder's arguments (no Ray instance) -----------------------------------------------------
def test_arguments_are_parleys_flags_and_rays_settings():
    engine, server, ray_args = parse_args({"model_id": "/m", "max_batch_total_tokens": "4096", "no_playground": "true",
                                           "served_model_name": "a,b", "min_replicas": "1", "max_replicas": 3})
    assert engine.model_id == "/m" and engine.max_batch_total_tokens == 4096
    assert engine.num_threads == 1  # one torch thread per CPU of the replica, not every core
    assert server.served_model_names == ("a", "b") and server.playground is False
    assert ray_args["min_replicas"] == 1 and ray_args["max_replicas"] == 3


@pytest.mark.parametrize("args, named", [({"modle_id": "x"}, "modle_id"), ({"port": 9000}, "port"),
                                         ({"upscale_delay_s": 1}, "upscale_delay_s"),  # without autoscaling
                                         ({"num_replicas": 2, "max_replicas": 3}, "num_replicas"),
                                         ({"max_batch_total_tokens": "lots"}, "max_batch_total_tokens"),
                                         ({"router": "random"}, "router"), ({"no_playground": "maybe"}, "no_playground")])
def test_a_wrong_argument_is_refused_naming_it(args, named):
    with pytest.raises(ValueError, match=named):
        parse_args(args)


def replica_deployment(args: dict):
    return build(args)._bound_deployment.init_args[0]._bound_deployment  # the ingress's first argument


def test_autoscaling_and_backpressure_settings_reach_the_deployment():
    config = replica_deployment({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                                 "max_ongoing_requests": 8, "max_queued_requests": 5})._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 4)
    assert config.autoscaling_config.target_ongoing_requests == 3
    assert (config.max_ongoing_requests, config.max_queued_requests) == (8, 5)
    assert config.request_router_config.request_router_class.endswith("PrefixAffinityRouter")
    fixed = replica_deployment({"num_replicas": 2, "router": "power_of_two"})
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 2
    assert build({"ingress_replicas": 3})._bound_deployment.num_replicas == 3


class DyingAnswer:
    """A replica's answer whose replica dies after `chunks` (a DeploymentResponseGenerator's part)."""

    def __init__(self, chunks: list[bytes]):
        self.chunks, self.cancelled = list(chunks), False

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        raise ray.exceptions.ActorDiedError()

    def cancel(self) -> None:
        self.cancelled = True


async def rest(answer, path: str, headers: list) -> list[bytes]:
    return [chunk async for chunk in _rest(answer, path, ResponseStart(200, headers))]


async def test_a_replica_dying_after_a_whole_body_loses_nothing():
    answer = DyingAnswer([b'{"a":', b"1}"])
    assert await rest(answer, "/generate", [(b"content-length", b"6")]) == [b'{"a":', b"1}"]
    assert answer.cancelled
    assert await rest(DyingAnswer([]), "/health", [(b"content-length", b"0")]) == []


async def test_a_replica_dying_mid_stream_ends_it_with_an_error_event_in_the_routes_dialect():
    sse = [(b"content-type", b"text/event-stream")]
    *_, last = await rest(DyingAnswer([b"data: {}\n\n"]), "/v1/messages", sse)
    name, data = last.split(b"\n", 1)
    assert name == b"event: error"  # Anthropic's events are named
    body = orjson.loads(data[len(b"data: "):])
    assert body["type"] == "error" and body["error"]["type"] == "api_error" and "died" in body["error"]["message"]
    *_, last = await rest(DyingAnswer([b"data: {}\n\n"]), "/generate_stream", sse)
    body = orjson.loads(last[len(b"data: "):])
    assert body["error_type"] == "unhealthy" and "died" in body["error"]
    with pytest.raises(ray.exceptions.ActorDiedError):  # a JSON body cut short: the connection ends
        await rest(DyingAnswer([b'{"a":']), "/generate", [(b"content-length", b"6")])


# -- a live application ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("ray_model"), seed=5, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def url(model):
    # autoscaling metrics every 0.5 s, not 10: test_autoscaling_* waits for Ray's decisions
    pushes = {f"RAY_SERVE_{side}_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5" for side in ("REPLICA", "HANDLE")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **pushes}})
    try:
        # the workers import this worktree's parley, not another installed copy
        parley_file = ray.remote(lambda: __import__("parley").__file__)  # a lambda: pickled whole, not by name
        assert ray.get(parley_file.remote()).startswith(str(REPO))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({**ARGS, "model_id": model}), name="parley", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def single(model):
    """The same model behind one in-process server, as `parley serve` runs it."""
    engine, server, _ = parse_args({**ARGS, "model_id": model})
    with TestClient(create_app(server, engine, lambda: load_engine(engine))) as client:
        deadline = time.monotonic() + DEADLINE_S
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


def replica_ids(http, wanted: int = 2) -> set[str]:
    """The replicas answering now (ties between idle replicas are broken at random)."""
    seen: set[str] = set()
    deadline = time.monotonic() + DEADLINE_S
    while len(seen) < wanted and time.monotonic() < deadline:
        response = http.get("/health")
        if response.status_code == 200:
            seen.add(response.headers[REPLICA_HEADER])
    assert len(seen) >= wanted, seen
    return seen


# ids and times, and prefix-cache hits (which depend on what each server ran before)
VOLATILE = {"id", "created", "created_at", "completed_at", "system_fingerprint", "prompt_tokens_details",
            "input_tokens_details", "cache_read_input_tokens"}


def stable(value):
    """An answer without what differs between two servers' answers to the same request."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


GREEDY = [
    ("POST", "/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 8, "details": True}}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                      "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("POST", "/v1/messages", {"model": "m", "max_tokens": 8, "temperature": 0, "system": "Be brief.",
                              "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/responses", {"model": "m", "input": "Hi", "max_output_tokens": 8, "temperature": 0, "store": False}),
    ("POST", "/tokenize", {"inputs": "Hello there"}),
    ("GET", "/info", None),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": "not a list"}),  # 422
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "colour": 1}),
    ("POST", "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "Hi"}]}),  # 404
    ("GET", "/no/such/route", None),
    ("POST", "/generate", {"inputs": "x" * 200_000}),  # 413: past payload_limit
]


@pytest.mark.parametrize("method, path, payload", GREEDY, ids=[f"{m} {p}" for m, p, _ in GREEDY])
def test_every_route_answers_as_a_single_server(http, single, method, path, payload):
    ours = http.request(method, path, json=payload)
    theirs = single.request(method, path, json=payload)
    assert ours.status_code == theirs.status_code, ours.text
    assert ours.headers.get("content-type") == theirs.headers.get("content-type")
    if theirs.content:
        assert stable(ours.json()) == stable(theirs.json())
    else:
        assert ours.content == b""
    assert (REPLICA_HEADER in ours.headers) == (ours.status_code != 413)  # the ingress refuses a 413 itself


def stream_events(response) -> list[bytes]:
    return [line[len(b"data: "):] for line in response.iter_bytes() for line in line.split(b"\n\n")
            if line.startswith(b"data: ")]


def test_streams_answer_as_a_single_server(http, single):
    payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0,
               "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=payload) as ours:
        assert ours.status_code == 200 and ours.headers["content-type"] == "text/event-stream"
        raw = ours.read()
    ours_events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e]
    theirs = single.post("/v1/chat/completions", json=payload).content
    theirs_events = [e[len(b"data: "):] for e in theirs.split(b"\n\n") if e]
    assert ours_events[-1] == theirs_events[-1] == b"[DONE]"
    assert [stable(orjson.loads(e)) for e in ours_events[:-1]] == [stable(orjson.loads(e)) for e in theirs_events[:-1]]
    tgi = http.post("/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert tgi.status_code == 200 and tgi.text.count("data:") == 5


GATEWAY_GAUGES = ("parley_num_requests_waiting", "parley_num_requests_running", "parley_kv_cache_usage_perc",
                  "parley_lora_adapters_loaded")


def test_each_replicas_metrics_are_read_by_naming_it(http):
    for replica in replica_ids(http):
        response = http.get("/metrics", headers={REPLICA_HEADER: replica})
        assert response.status_code == 200 and response.headers[REPLICA_HEADER] == replica
        for name in GATEWAY_GAUGES:
            metric(response.text, name)  # present, as a single server exports it
    unknown = http.get("/metrics", headers={REPLICA_HEADER: "gone"})
    assert unknown.status_code == 404 and "gone" in unknown.json()["error"]


def chat(system: str, question: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 2}


def test_requests_sharing_a_long_prefix_go_to_the_replica_that_served_it(http):
    served: dict[str, set[str]] = {"a": set(), "b": set()}
    for i in range(5):
        for name, system in (("a", SYSTEM_A), ("b", SYSTEM_B)):
            response = http.post("/v1/chat/completions", json=chat(system, f"question {i}"))
            assert response.status_code == 200, response.text
            served[name].add(response.headers[REPLICA_HEADER])
    assert len(served["a"]) == 1 and len(served["b"]) == 1, served  # Ray's default would spread them at random
    # ... where the system prompt's blocks were found in the prefix cache
    replica = served["a"].pop()
    text = http.get("/metrics", headers={REPLICA_HEADER: replica}).text
    assert metric(text, "parley_prefix_cache_hit_tokens_total") > 4 * 100


def long_chat(tokens: int, **pinned) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Count"}], "max_tokens": tokens,
            "min_tokens": tokens, **pinned}


def test_when_every_replica_and_the_queue_are_full_the_client_gets_429_at_once(http):
    # 2 replicas x max_ongoing_requests 2, and max_queued_requests 2: 6 at most; the rest 429
    def send(_):
        return http.post("/v1/chat/completions", json=long_chat(400))

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(a.status_code == 200 for a in answers if a not in refused), [a.status_code for a in answers]
    assert len(answers) - len(refused) >= 4
    for answer in refused:
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["type"] == "overloaded" and answer.json()["error_type"] == "overloaded"


def test_a_client_that_goes_away_mid_stream_aborts_its_request_on_the_replica(url, http):
    replica = sorted(replica_ids(http))[0]
    before = metric(http.get("/metrics", headers={REPLICA_HEADER: replica}).text, "parley_request_cancelled")
    with httpx.stream("POST", url + "/v1/chat/completions", json={**long_chat(4000), "stream": True},
                      headers={REPLICA_HEADER: replica}, timeout=CLIENT_TIMEOUT_S) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]
    # the connection is closed: Ray cancels the call, the replica's app hears http.disconnect

    def cancelled() -> bool:
        text = http.get("/metrics", headers={REPLICA_HEADER: replica}).text
        return metric(text, "parley_request_cancelled") > before and metric(text, "parley_num_requests_running") == 0

    wait_for(cancelled, "the replica aborting the request")


def replica_actor(replica: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


class Reader(threading.Thread):
    """Reads one SSE stream to its end, noting each event."""

    def __init__(self, url: str, payload: dict, replica: str):
        super().__init__(daemon=True)
        self.url, self.payload, self.replica = url, payload, replica
        self.events: list[bytes] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.payload, timeout=CLIENT_TIMEOUT_S,
                              headers={REPLICA_HEADER: self.replica}) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):].encode())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.05)


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_and_comes_back(url, http):
    doomed, survivor = sorted(replica_ids(http))
    streams = {r: Reader(url, {**long_chat(4000), "stream": True}, r) for r in (doomed, survivor)}
    for stream in streams.values():
        stream.start()
    wait_for(lambda: all(len(s.events) >= 3 or not s.is_alive() for s in streams.values()), "both streams started")
    assert all(s.status == 200 for s in streams.values()), [s.status for s in streams.values()]
    # Ray streams a replica's output ahead of the client: the replica must still be generating
    metrics = http.get("/metrics", headers={REPLICA_HEADER: doomed}).text
    assert metric(metrics, "parley_num_requests_running") == 1, "the stream ended before the kill: make it longer"
    ray.kill(replica_actor(doomed))

    # the killed replica's stream ends, with an error event, not a hang
    streams[doomed].join(DEADLINE_S)
    assert not streams[doomed].is_alive(), "the killed replica's stream did not end"
    last = orjson.loads(streams[doomed].events[-1])
    assert last["error"]["type"] == "unhealthy" and "died" in last["error"]["message"], last
    # new requests are answered while Ray brings a replica back
    for i in range(3):
        response = http.post("/v1/chat/completions", json=chat(SYSTEM_A, f"after {i}"))
        assert response.status_code == 200, response.text
    # the other replica's stream was not disturbed: all its tokens, then [DONE]
    streams[survivor].join(DEADLINE_S)
    events = streams[survivor].events
    assert streams[survivor].error is None and events[-1] == b"[DONE]", events[-3:]
    finals = [orjson.loads(e) for e in events[:-1]]
    assert [c["finish_reason"] for e in finals for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert finals[-1]["usage"] is None or finals[-1]["usage"]["completion_tokens"] == 4000
    # a new replica takes the dead one's place
    wait_for(lambda: any(r not in (doomed, survivor) for r in replica_ids(http, 1)), "a new replica answering")
    assert doomed not in replica_ids(http)


def running_replicas() -> int:
    return serve.status().applications["parley"].deployments["ParleyReplica"].replica_states.get("RUNNING", 0)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(model, url, http):
    serve.delete("parley")  # a rolling update would start the new replicas before the old stop: 2 CPUs hold 2
    fixed = {name: value for name, value in ARGS.items() if name != "num_replicas"}
    # room in Ray's queue for the three clients: a replica's finished request is counted as ongoing
    # a moment after the client has sent its next one, and with max_queued_requests 2 Ray refused
    # one of them (a 429, seen in a full run): backpressure has its own test above
    serve.run(build({**fixed, "model_id": model, "min_replicas": 1, "max_replicas": 2, "max_queued_requests": 8,
                     "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 1}),
              name="parley", route_prefix="/")
    wait_for(lambda: running_replicas() == 1, "one replica to begin with")  # serve.run may return a moment early
    scaled = threading.Event()

    def keep_busy() -> list[int]:
        # Requests one after another until the second replica runs: a fixed batch of them could end
        # (on a busy machine) before the replica started, and the autoscaler then never kept it.
        statuses = []
        while not scaled.is_set():
            statuses.append(http.post("/v1/chat/completions", json=long_chat(3000)).status_code)
        return statuses

    with ThreadPoolExecutor(3) as pool:
        load = [pool.submit(keep_busy) for _ in range(3)]
        try:
            wait_for(lambda: running_replicas() == 2, "a second replica under load")
        finally:
            scaled.set()
        statuses = [status for f in load for status in f.result()]
        assert statuses and all(status == 200 for status in statuses), statuses
    wait_for(lambda: running_replicas() == 1, "back to one replica once idle")
