"""docs/grafana/parley.json queries only what Parley's /metrics exports (on the real server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).parent.parent.parent / "docs" / "grafana" / "parley.json"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "err", "adapter"}


def exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_names(text: str) -> set[str]:
    """Every sample name in a Prometheus exposition, and every family its # TYPE lines declare."""
    names = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
    return names


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_metric_the_dashboard_queries_is_exported(http):
    http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 0}})  # a failure: err="validation"
    text = http.get("/metrics").text
    exported = exported_names(text)
    queried = {word for expr in exprs() for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r'"[^"]*"', "", expr))
               if word not in PROMQL_WORDS and not word.startswith("__")}
    assert queried and queried <= exported, sorted(queried - exported)
    assert re.search(r'^tgi_request_failure\{err="validation"\}', text, re.M)  # the label the dashboard groups by
    # the headline figures are all there
    assert {"parley_generated_tokens_total", "parley_time_to_first_token_bucket", "parley_prefix_cache_hit_tokens_total",
            "tgi_request_mean_time_per_token_duration_bucket", "tgi_queue_size", "parley_kv_blocks_used",
            "tgi_request_failure"} <= queried
