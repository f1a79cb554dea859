"""The prefix router's knowledge, without Ray: prompt text, the prefix table, the ranking."""

import orjson
import pytest

from parley.deploy.routing import PrefixTable, block_hashes, prompt_text, rank_replicas

SYSTEM = "You are a careful assistant. " * 20


def body(payload) -> bytes:
    return orjson.dumps(payload)


def test_prompt_text_of_each_dialect_starts_with_what_the_prompt_starts_with():
    chat = prompt_text(body({"model": "m", "messages": [{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}))
    assert chat.startswith("system\n" + SYSTEM) and chat.endswith("user\nhi\n")
    anthropic = prompt_text(body({"system": SYSTEM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
    assert anthropic.startswith(SYSTEM)
    assert prompt_text(body({"inputs": SYSTEM + "x", "parameters": {}})) == SYSTEM + "x\n"
    assert prompt_text(body({"prompt": [SYSTEM, "b"]})) == SYSTEM + "\nb\n"
    assert prompt_text(body({"instructions": SYSTEM, "input": "hi"})) == SYSTEM + "\nhi\n"


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"max_tokens": 3}', b'{"messages": 7}'])
def test_prompt_text_is_empty_when_there_is_none(raw):
    assert prompt_text(raw) == ""


def test_block_hashes_chain_on_the_prefix():
    a, b = block_hashes("x" * 64 + "y" * 64, 64), block_hashes("z" * 64 + "y" * 64, 64)
    assert len(a) == 2 and a[1] != b[1]  # the same block after a different prefix is another block
    assert block_hashes("x" * 63, 64) == []


def test_table_matches_the_longest_prefix_each_replica_served():
    table = PrefixTable(block_chars=8)
    table.record("a" * 40, "r1")
    table.record("a" * 16 + "b" * 24, "r2")
    assert table.matched_chars("a" * 40 + "tail", ["r1", "r2"]) == {"r1": 40, "r2": 16}
    assert table.matched_chars("a" * 40, ["r2"]) == {"r2": 16}
    assert table.matched_chars("c" * 40, ["r1", "r2"]) == {}
    table.forget("r1")
    assert table.matched_chars("a" * 40, ["r1", "r2"]) == {"r2": 16}


def test_table_forgets_the_least_recently_used_blocks_past_its_capacity():
    table = PrefixTable(block_chars=4, capacity=3)
    table.record("aaaabbbbcccc", "r1")
    table.record("dddd", "r2")
    assert len(table) == 3
    assert table.matched_chars("aaaabbbbcccc", ["r1"]) == {}  # its first block went first
    assert table.matched_chars("dddd", ["r2"]) == {"r2": 4}
    with pytest.raises(ValueError):
        PrefixTable(block_chars=0)


def test_ranking_follows_the_prefix_unless_its_replica_is_much_busier():
    loads = {"r1": 3, "r2": 1, "r3": 1}
    assert rank_replicas(loads, {"r1": 512}, 256, imbalance=4) == [["r1"], ["r2", "r3"]]
    assert rank_replicas(loads, {"r1": 512}, 256, imbalance=1) == [["r2", "r3"], ["r1"]]  # 3 > 1 + 1
    assert rank_replicas(loads, {"r1": 128}, 256, imbalance=4) == [["r2", "r3"], ["r1"]]  # too short to matter
    assert rank_replicas(loads, {"r1": 512, "r3": 768}, 256, 4) == [["r3"], ["r2", "r1"]]  # the longest wins
    assert rank_replicas(loads, {"r2": 512, "r3": 512}, 256, 4)[0] == ["r2"]  # a tie: the less loaded first
    assert rank_replicas({}, {}, 256, 4) == []
