"""Token-bucket rate limits per tenant, on a fake clock."""
from __future__ import annotations

import pytest

from llmaas.app.errors import RateLimited
from llmaas.app.rate_limit import RateLimiter, RateLimitSettings, budget_headers, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_minutes_burst_then_429_with_the_wait_until_one_request_refills():
    clock = Clock()
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=3), clock)
    budgets = [limiter.acquire("alice") for _ in range(3)]
    assert [b.remaining for b in budgets] == [2, 1, 0]
    with pytest.raises(RateLimited) as err:
        limiter.acquire("alice")
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.retry_after_s == pytest.approx(20.0)  # 3/min refills one every 20 s
    clock.now += 19.0
    with pytest.raises(RateLimited):
        limiter.acquire("alice")
    clock.now += 1.0
    assert limiter.acquire("alice").remaining == 0


def test_tenants_have_separate_buckets_and_overrides():
    clock = Clock()
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=1, tenants={"batch": 5, "ops": None}), clock)
    limiter.acquire("alice")
    with pytest.raises(RateLimited):
        limiter.acquire("alice")
    limiter.acquire("bob")  # alice spending hers leaves bob's alone
    for _ in range(5):
        limiter.acquire("batch")
    with pytest.raises(RateLimited):
        limiter.acquire("batch")
    assert all(limiter.acquire("ops") is None for _ in range(100))  # unlimited


def test_refill_never_exceeds_the_burst():
    clock = Clock()
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=2), clock)
    limiter.acquire(None)
    clock.now += 3600
    assert [limiter.acquire(None).remaining for _ in range(2)] == [1, 0]
    with pytest.raises(RateLimited):
        limiter.acquire(None)


def test_off_by_default_and_headers():
    assert RateLimiter(RateLimitSettings()).acquire("anyone") is None
    clock = Clock()
    budget = RateLimiter(RateLimitSettings(requests_per_minute=60), clock).acquire("a")
    assert budget_headers(budget) == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                                      "x-ratelimit-reset-requests": "1.000s"}
    assert [retry_after(s) for s in (0.01, 1.0, 1.2, 20.0)] == ["1", "1", "2", "20"]


def test_a_request_of_k_choices_costs_k_and_a_refused_one_costs_nothing():
    clock = Clock()
    limiter = RateLimiter(RateLimitSettings(requests_per_minute=6), clock)
    assert limiter.acquire("alice", cost=4).remaining == 2
    with pytest.raises(RateLimited) as err:
        limiter.acquire("alice", cost=3)
    assert err.value.retry_after_s == pytest.approx(10.0)  # 6/min: the missing one refills in 10 s
    assert limiter.acquire("alice", cost=2).remaining == 0  # the refusal spent nothing


def test_a_request_bigger_than_the_bucket_waits_for_a_full_bucket_not_forever():
    clock = Clock()
    limiter = RateLimiter(RateLimitSettings(tenants={"trial": 3}), clock)
    assert limiter.acquire("other", cost=8) is None  # no limit for it
    assert limiter.acquire("trial", cost=8).remaining == 0  # n=8 on a 3-per-minute tenant: the whole bucket
    with pytest.raises(RateLimited) as err:
        limiter.acquire("trial", cost=8)
    assert err.value.retry_after_s == pytest.approx(60.0)  # a full bucket again in a minute, then it passes
    clock.now += 60.0
    assert limiter.acquire("trial", cost=8) is not None


def test_a_429_raised_in_another_ray_process_keeps_its_retry_after():
    import pickle  # what Ray does to an exception raised in an actor (the JobRunner's job cap)

    err = pickle.loads(pickle.dumps(RateLimited("busy", retry_after_s=60.0, param="model", code="too_many_jobs")))
    assert (err.retry_after_s, err.param, err.code, err.status_code) == (60.0, "model", "too_many_jobs", 429)


def test_tokens_are_reserved_up_front_and_the_unused_part_comes_back():
    clock = Clock()
    settings = RateLimitSettings(tokens_per_minute=1000, tenant_tokens={"big": {"tokens_per_minute": 5000}})
    limiter = RateLimiter(settings, clock)
    assert limiter.reserve_tokens("alice", 600).remaining == 400
    with pytest.raises(RateLimited) as err:
        limiter.reserve_tokens("alice", 600)
    assert err.value.type == "tokens" and err.value.code == "rate_limit_exceeded"
    assert err.value.retry_after_s == pytest.approx(12.0)  # 200 missing at 1000/min
    assert err.value.headers["x-ratelimit-limit-tokens"] == "1000"
    assert err.value.headers["x-ratelimit-remaining-tokens"] == "400"
    limiter.settle_tokens("alice", 600, used=50)  # the first request used 50 of its 600
    assert limiter.reserve_tokens("alice", 600).remaining == 350
    limiter.settle_tokens("alice", 600, used=0)  # the second one failed: all of it back
    limiter.settle_tokens("alice", 10**6, used=0)
    assert limiter.reserve_tokens("alice", 0).remaining == 1000  # never above a full bucket
    assert limiter.reserve_tokens("big", 4000).limit == 5000  # an override
    whole = limiter.reserve_tokens("alice", 10**6)  # bigger than the bucket: it takes the whole bucket, no more
    assert (whole.remaining, whole.taken) == (0, 1000)
    limiter.settle_tokens("alice", whole.taken, used=1500)  # and pays for what it used beyond it
    with pytest.raises(RateLimited) as err:
        limiter.reserve_tokens("alice", 1)
    assert err.value.retry_after_s == pytest.approx(30.06)  # 500 overrun + 1 at 1000/min
    clock.now += 60.0
    assert limiter.reserve_tokens("alice", 400).remaining == 100  # the overrun was paid out of this minute
    assert RateLimiter(RateLimitSettings(), clock).reserve_tokens("alice", 10**9) is None


def test_the_monthly_quota_refuses_once_spent_until_the_month_ends():
    settings = RateLimitSettings(monthly_tokens=10_000, tenant_tokens={"trial": {"monthly_tokens": 100}})
    limiter = RateLimiter(settings, Clock())
    assert limiter.reserve_tokens("alice", 500, used_this_month=9_999) is None  # no token rate: just the quota
    with pytest.raises(RateLimited) as err:
        limiter.reserve_tokens("trial", 1, used_this_month=100)
    assert err.value.type == "insufficient_quota" and err.value.code == "insufficient_quota"
    assert 0 < err.value.retry_after_s <= 31 * 86400
    assert settings.token_limits_for("trial").monthly_tokens == 100
    assert settings.token_limits_for(None).monthly_tokens == 10_000


def test_a_token_429_keeps_its_type_across_processes():
    import pickle

    err = RateLimited("tokens", retry_after_s=3.0, type_="tokens", headers={"x-ratelimit-limit-tokens": "9"})
    back = pickle.loads(pickle.dumps(err))
    assert (back.type, back.headers, back.retry_after_s) == ("tokens", {"x-ratelimit-limit-tokens": "9"}, 3.0)
