"""The gauges an inference gateway routes by, as /metrics renders them (vLLM's meanings), and the
draft counters (vLLM's spec_decode ones)."""

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from parley.observability.metrics import Metrics


@dataclass
class Stats:
    kv_blocks_used: int = 30
    kv_blocks_total: int = 120
    waiting: int = 5  # sequences
    running: int = 4
    adapter_requests: dict = field(default_factory=dict)
    generated_tokens: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    requests_waiting: int = 2  # requests: best_of/n count once
    requests_running: int = 3
    adapters_loaded: int = 3
    running_adapters: tuple = ("sql", "summary")
    waiting_adapters: tuple = ("fr",)
    max_adapters_per_batch: int = 64
    compute_threads: int = 1
    draft_tokens: int = 40
    draft_accepted_tokens: int = 25


def families(stats) -> dict:
    body, _ = Metrics(lambda: stats).render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(found: dict, name: str) -> float:
    return found[name].samples[0].value


def test_gateway_gauges_have_vllms_meanings():
    found = families(Stats())
    assert value(found, "parley_num_requests_waiting") == 2 and value(found, "parley_num_requests_running") == 3
    assert value(found, "parley_kv_cache_usage_perc") == 0.25  # 0..1, not a percentage
    assert value(found, "parley_lora_adapters_loaded") == 3
    assert value(found, "parley_compute_threads") == 1  # not vLLM's: steps on fewer threads (engine/threads.py)
    (sample,) = found["parley_lora_requests_info"].samples
    assert sample.labels == {"running_lora_adapters": "sql,summary", "waiting_lora_adapters": "fr", "max_lora": "64"}
    assert sample.value > 1.7e9  # when it was read, as vLLM's: the picker takes the newest
    # counters, so their family names lose the _total of the samples
    assert value(found, "parley_draft_tokens") == 40 and value(found, "parley_draft_accepted_tokens") == 25


def test_an_empty_kv_pool_and_no_adapters():
    found = families(Stats(kv_blocks_total=0, kv_blocks_used=0, running_adapters=(), waiting_adapters=()))
    assert value(found, "parley_kv_cache_usage_perc") == 0
    assert found["parley_lora_requests_info"].samples[0].labels["running_lora_adapters"] == ""
