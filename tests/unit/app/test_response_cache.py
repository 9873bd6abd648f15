from __future__ import annotations

import pytest

from llmaas.app.response_cache import ResponseCache

GREEDY = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5}


@pytest.mark.parametrize("request_, cacheable", [
    (GREEDY, True),
    ({**GREEDY, "temperature": 0.7}, False),
    ({**GREEDY, "temperature": 0.7, "seed": 3}, True),
    ({**GREEDY, "temperature": 0.7, "top_k": 1}, True),
])
def test_only_deterministic_requests_have_keys(request_, cacheable):
    assert (ResponseCache.key("t", "m@1", request_) is not None) is cacheable


def test_key_separates_tenants_and_versions_but_not_streaming_flags():
    k = ResponseCache.key("alice", "m@1", GREEDY)
    assert k != ResponseCache.key("bob", "m@1", GREEDY)
    assert k != ResponseCache.key("alice", "m@2", GREEDY)
    assert k == ResponseCache.key("alice", "m@1", {**GREEDY, "stream": False, "user": "u", "model": "alias"})


def test_lru_bound_and_counters():
    cache = ResponseCache(2)
    for i in range(3):
        cache.put(f"k{i}", i)
    assert cache.get("k0") is None and cache.get("k2") == 2 and cache.get("k1") == 1
    assert (cache.hits, cache.misses) == (2, 1)
    off = ResponseCache(0)
    off.put("k", 1)
    assert off.get("k") is None and off.misses == 0
