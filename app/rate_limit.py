"""Per-tenant limits: requests per minute, tokens per minute and a monthly token quota, answered with 429.

A bucket holds up to a minute's budget (a burst) and refills continuously at a sixtieth of it per second,
so a tenant can spend its minute's budget at once but never more than that per minute on average. A
request costs one request per choice; its tokens are reserved at admission (the prompt plus every
choice's max_tokens) and what it did not use is given back when it ends. The monthly quota counts the
tokens the usage ledger metered this calendar month (UTC): a request is refused once the quota is spent
(one under way finishes). The buckets live in one place for the cluster, the usage service actor
(deployments/usage_service.py), so the limits hold whatever the number of Router replicas.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.errors import RateLimited

PositiveRate = Annotated[float, Field(gt=0)]


class TokenLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens_per_minute: float | None = Field(None, gt=0, description="Prompt + completion tokens per minute.")
    monthly_tokens: int | None = Field(None, gt=0, description="Prompt + completion tokens per calendar month.")


class RateLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: float | None = Field(
        None, gt=0, description="Every tenant's limit (the keyless default counts as one tenant); none = unlimited.")
    tenants: dict[str, PositiveRate | None] = Field(
        default_factory=dict, description="Per-tenant overrides, e.g. {batch-team: 6000, trial: 20}; null = unlimited.")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Every tenant's token rate (prompt + max_tokens reserved at admission, the unused "
                                "part given back at the end); none = unlimited.")
    monthly_tokens: int | None = Field(
        None, gt=0, description="Every tenant's quota of metered tokens per calendar month (UTC); none = unlimited.")
    tenant_tokens: dict[str, TokenLimits] = Field(
        default_factory=dict, description="Per-tenant token limits, e.g. {trial: {tokens_per_minute: 2000, "
                                          "monthly_tokens: 100000}}; a field it leaves out keeps the default.")

    def limit_for(self, tenant: str | None) -> float | None:
        if tenant is not None and tenant in self.tenants:
            return self.tenants[tenant]
        return self.requests_per_minute

    def token_limits_for(self, tenant: str | None) -> TokenLimits:
        limits = TokenLimits(tokens_per_minute=self.tokens_per_minute, monthly_tokens=self.monthly_tokens)
        override = self.tenant_tokens.get(tenant) if tenant is not None else None
        if override is not None:
            limits = limits.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})
        return limits



@dataclass(slots=True)
class Budget:
    """What a request saw of its tenant's bucket (the x-ratelimit-* response headers)."""

    limit: int             # requests (or tokens) per minute
    remaining: int         # whole requests (tokens) left in the bucket after this one
    reset_s: float         # seconds until the bucket is full again
    taken: float = 0.0     # what this request took from the bucket (a cost above a whole bucket takes the bucket)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._buckets: dict[str | None, _Bucket] = {}
        self._token_buckets: dict[str | None, _Bucket] = {}

    def acquire(self, tenant: str | None, cost: float = 1.0) -> Budget | None:
        """Spends ``cost`` requests of ``tenant``'s budget (a request of n choices costs n); raises RateLimited
        when that much is not left. None: unlimited."""
        rpm = self.settings.limit_for(tenant)
        if rpm is None:
            return None
        cost = min(cost, rpm)  # a request bigger than the whole bucket waits for a full one, not forever
        bucket = self._refilled(self._buckets, tenant, rpm)
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / (rpm / 60.0)
            raise RateLimited(f"rate limit reached: {rpm:g} requests (choices) per minute for this tenant; this "
                              f"request needs {cost:g}; retry in {wait:.1f} s", code="rate_limit_exceeded",
                              retry_after_s=wait, headers=budget_headers(self._budget(rpm, bucket)))
        bucket.tokens -= cost
        return self._budget(rpm, bucket)

    def reserve_tokens(self, tenant: str | None, tokens: int, used_this_month: int = 0) -> Budget | None:
        """Takes ``tokens`` from the tenant's token bucket (capped at a whole bucket, like ``acquire``) after
        checking its monthly quota against ``used_this_month``; raises RateLimited (429) when either says no.
        None: no token rate limit (the quota, if any, passed)."""
        limits = self.settings.token_limits_for(tenant)
        quota = limits.monthly_tokens
        if quota is not None and used_this_month >= quota:
            wait = seconds_to_month_end(time.time())
            raise RateLimited(f"monthly token quota reached: {used_this_month} of {quota} tokens used this month; "
                              f"it renews in {wait / 86400:.1f} days", code="insufficient_quota",
                              type_="insufficient_quota", retry_after_s=wait)
        tpm = limits.tokens_per_minute
        if tpm is None:
            return None
        cost = min(tokens, tpm)
        bucket = self._refilled(self._token_buckets, tenant, tpm)
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / (tpm / 60.0)
            raise RateLimited(f"rate limit reached: {tpm:g} tokens per minute for this tenant; this request "
                              f"reserves {cost:g} (prompt + max_tokens of each choice); retry in {wait:.1f} s",
                              code="rate_limit_exceeded", type_="tokens", retry_after_s=wait,
                              headers=budget_headers(self._budget(tpm, bucket), "tokens"))
        bucket.tokens -= cost
        budget = self._budget(tpm, bucket)
        budget.taken = cost
        return budget

    def settle_tokens(self, tenant: str | None, taken: float, used: int) -> None:
        """A request that took ``taken`` tokens at admission used ``used``: the rest goes back (never above a full
        bucket), a use beyond it is charged (the bucket may go below zero: later requests wait for it)."""
        tpm = self.settings.token_limits_for(tenant).tokens_per_minute
        if tpm is not None and taken != used:
            bucket = self._refilled(self._token_buckets, tenant, tpm)
            bucket.tokens = min(tpm, bucket.tokens + taken - used)

    def _refilled(self, buckets: dict[str | None, _Bucket], tenant: str | None, per_minute: float) -> _Bucket:
        now = self.clock()
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(tokens=per_minute, updated=now)
        bucket.tokens = min(per_minute, bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
        bucket.updated = now
        return bucket

    @staticmethod
    def _budget(rpm: float, bucket: _Bucket) -> Budget:
        return Budget(limit=int(rpm), remaining=max(0, int(bucket.tokens)),
                      reset_s=(rpm - bucket.tokens) / (rpm / 60.0))


def budget_headers(budget: Budget, unit: str = "requests") -> dict[str, str]:
    """OpenAI's rate-limit response headers (``unit``: requests or tokens)."""
    return {f"x-ratelimit-limit-{unit}": str(budget.limit),
            f"x-ratelimit-remaining-{unit}": str(budget.remaining),
            f"x-ratelimit-reset-{unit}": f"{budget.reset_s:.3f}s"}


def month_key(t: float) -> str:
    """The calendar month (UTC) of unix time ``t``: '2026-11'."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m")


def seconds_to_month_end(t: float) -> float:
    now = datetime.fromtimestamp(t, timezone.utc)
    nxt = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return (nxt - now).total_seconds()


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is admitted."""
    return str(max(1, math.ceil(seconds)))
