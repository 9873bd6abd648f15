"""Per-tenant request rate limits: one token bucket per tenant, answered with 429 + Retry-After.

A bucket holds up to ``requests_per_minute`` requests (a minute's burst) and refills
continuously at ``requests_per_minute / 60`` per second, so a tenant can spend its
minute's budget at once but never more than that per minute on average. Buckets
live in the Router replica: with R Router replicas a tenant gets at most R times its
limit (one Router replica is the default; README says so).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.errors import RateLimited

PositiveRate = Annotated[float, Field(gt=0)]


class RateLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: float | None = Field(
        None, gt=0, description="Every tenant's limit (the keyless default counts as one tenant); none = unlimited.")
    tenants: dict[str, PositiveRate | None] = Field(
        default_factory=dict, description="Per-tenant overrides, e.g. {batch-team: 6000, trial: 20}; null = unlimited.")

    def limit_for(self, tenant: str | None) -> float | None:
        if tenant is not None and tenant in self.tenants:
            return self.tenants[tenant]
        return self.requests_per_minute


@dataclass(slots=True)
class Budget:
    """What a request saw of its tenant's bucket (the x-ratelimit-* response headers)."""

    limit: int             # requests per minute
    remaining: int         # whole requests left in the bucket after this one
    reset_s: float         # seconds until the bucket is full again


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._buckets: dict[str | None, _Bucket] = {}

    def capacity(self, tenant: str | None) -> float | None:
        """The most a request of ``tenant`` can ever spend (its bucket's size); None: unlimited."""
        return self.settings.limit_for(tenant)

    def acquire(self, tenant: str | None, cost: float = 1.0) -> Budget | None:
        """Spends ``cost`` requests of ``tenant``'s budget (a request of n choices costs n); raises RateLimited
        when that much is not left. None: unlimited."""
        rpm = self.settings.limit_for(tenant)
        if rpm is None:
            return None
        cost = min(cost, rpm)  # a request bigger than the whole bucket waits for a full one, not forever
        now, rate = self.clock(), rpm / 60.0
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(tokens=rpm, updated=now)
        bucket.tokens = min(rpm, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / rate
            raise RateLimited(f"rate limit reached: {rpm:g} requests (choices) per minute for this tenant; this "
                              f"request needs {cost:g}; retry in {wait:.1f} s", code="rate_limit_exceeded",
                              retry_after_s=wait, headers=budget_headers(self._budget(rpm, bucket)))
        bucket.tokens -= cost
        return self._budget(rpm, bucket)

    @staticmethod
    def _budget(rpm: float, bucket: _Bucket) -> Budget:
        return Budget(limit=int(rpm), remaining=int(bucket.tokens), reset_s=(rpm - bucket.tokens) / (rpm / 60.0))


def budget_headers(budget: Budget) -> dict[str, str]:
    """OpenAI's rate-limit response headers."""
    return {"x-ratelimit-limit-requests": str(budget.limit),
            "x-ratelimit-remaining-requests": str(budget.remaining),
            "x-ratelimit-reset-requests": f"{budget.reset_s:.3f}s"}


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is admitted."""
    return str(max(1, math.ceil(seconds)))
