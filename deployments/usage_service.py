"""UsageService: the cluster's one usage ledger and rate-limit buckets (a named Ray actor), and the Router's
clients of it.

One actor per storage root, so every Router replica and every fine-tuning job adds to the same totals and a
``GET /v1/usage`` on any replica sees them all. Commits are grouped: records that arrive while a write is
under way go out together in the next one, and each ``record`` call returns once its records are stored,
so a request's usage is on storage before its answer (or its stream's ``[DONE]``) leaves the Router.

The per-tenant limits (app/rate_limit.py) are counted here too: one budget service rather than sharded
counters, because a tenant's limit then holds exactly whatever the number of Router replicas, the monthly
quota reads the same ledger that meters, and a Router asks only for tenants that have a limit (one actor
call, ~1 ms, per request and limit). Past a few thousand limited requests per second this actor is the
bottleneck; sharding its buckets by tenant is the next step then.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from llmaas.app.errors import APIError, ServiceUnavailable, unwrap
from llmaas.app.rate_limit import Budget, RateLimiter, RateLimitSettings
from llmaas.app.usage import GroupKey, UsageLedger, UsageRecord, inference_record
from llmaas.deployments.metrics import RouterMetrics
from llmaas.deployments.registry_service import actor_name

if TYPE_CHECKING:  # a type only: app.protocol brings torch (~1.5 s), which the usage and job actors never use
    from llmaas.app.protocol import Usage

logger = logging.getLogger("ray.serve")

RECORD_TIMEOUT_S = 10.0  # a Router waits this long for a commit, then answers anyway (the record stays queued)
LIMIT_TIMEOUT_S = 5.0  # a rate-limit check not answered by then is a 503, not a request hanging before admission
RETRY_COMMIT_S = 5.0  # records a failed commit left in memory are retried this often
Settle = tuple[str, "str | None", float, int]  # (limits JSON, tenant, tokens taken at admission, tokens used)


@ray.remote(num_cpus=0, max_restarts=-1)
class UsageService:
    def __init__(self, storage_root: str) -> None:
        self.ledger = UsageLedger(storage_root)
        self._added = 0  # records added since start
        self._stored = 0  # of those, how many are on storage
        self._commit_lock = asyncio.Lock()
        self._limiters: dict[str, RateLimiter] = {}  # by the limits' JSON: apps on one root may differ
        self._retry: asyncio.Task | None = None
        logger.info("usage ledger: %d records loaded from %s", self.ledger.loaded, storage_root)

    def _limiter(self, settings_json: str) -> RateLimiter:
        limiter = self._limiters.get(settings_json)
        if limiter is None:
            limiter = self._limiters[settings_json] = RateLimiter(RateLimitSettings.model_validate_json(settings_json))
        return limiter

    async def acquire(self, settings_json: str, tenant: str | None, cost: float) -> Budget | None:
        """Spends ``cost`` requests of the tenant's bucket; raises RateLimited when they are not there."""
        return self._limiter(settings_json).acquire(tenant, cost)

    async def reserve_tokens(self, settings_json: str, tenant: str | None, tokens: int) -> Budget | None:
        """Checks the monthly quota, then reserves ``tokens`` of the tenant's token bucket (RateLimited if not)."""
        return self._limiter(settings_json).reserve_tokens(tenant, tokens, self.ledger.month_tokens(tenant))

    async def settle(self, settle: Settle) -> None:
        """A request's token reservation against what it used (the rest back, an overrun charged)."""
        self._limiter(settle[0]).settle_tokens(*settle[1:])

    async def record(self, records: list[UsageRecord], settle: Settle | None = None) -> None:
        """Adds and stores ``records`` (and settles the request's token reservation, if it had one)."""
        if settle is not None:
            await self.settle(settle)
        self.ledger.add(records)
        self._added += len(records)
        await self._commit(self._added)
        if self._stored < self._added and (self._retry is None or self._retry.done()):
            self._retry = asyncio.get_running_loop().create_task(self._retry_commits())

    async def _retry_commits(self) -> None:
        """After a failed commit: try again every few seconds until storage takes everything."""
        while self._stored < self._added:
            await asyncio.sleep(RETRY_COMMIT_S)
            await self._commit(self._added)

    async def _commit(self, upto: int) -> None:
        async with self._commit_lock:
            if self._stored >= upto:  # a commit that ran while this call waited stored these too
                return
            target = self._added
            try:
                await asyncio.to_thread(self.ledger.commit)
            except Exception:  # storage down: the records stay in memory and go out with the next commit
                logger.exception("usage ledger: commit failed; %d records wait for the next", target - self._stored)
                return
            self._stored = target

    async def query(self, start: float | None, end: float | None, tenant: str | None, all_tenants: bool,
                    group_by: tuple[GroupKey, ...], bucket: str | None) -> dict:
        return self.ledger.query(start, end, tenant, all_tenants, group_by, bucket)


def get_usage_service(storage_root: Path | str):
    """The usage actor for this storage root, created on first use (detached: outlives any replica)."""
    return UsageService.options(name=actor_name("usage", storage_root), namespace="llmaas", lifetime="detached",
                                get_if_exists=True).remote(str(storage_root))


class UsageMeter:
    """The Router's ``Meter`` and limits: the tenant-labelled Prometheus counters at once, the ledger record
    submitted at once and awaited (bounded) by the caller; rate limits asked of the service only for tenants
    that have one."""

    def __init__(self, storage_root: str, limits: RateLimitSettings, metrics: RouterMetrics | None = None,
                 metering: bool = True) -> None:
        self.service = get_usage_service(storage_root)
        self.limits = limits
        self._limits_json = limits.model_dump_json()
        self.metrics = metrics
        self.metering = metering  # false: no usage records (Prometheus counters and token settling still run)

    async def acquire(self, tenant: str | None, cost: float = 1.0) -> Budget | None:
        """Spends ``cost`` of the tenant's request budget (429 when it is not there); None: no request limit."""
        if self.limits.limit_for(tenant) is None:
            return None
        return await _answer(self.service.acquire.remote(self._limits_json, tenant, cost))

    async def reserve_tokens(self, tenant: str | None, tokens: int) -> Budget | None:
        """Checks the monthly quota and reserves ``tokens`` (429 when either says no); None: no token rate limit."""
        limits = self.limits.token_limits_for(tenant)
        if limits.tokens_per_minute is None and limits.monthly_tokens is None:
            return None
        return await _answer(self.service.reserve_tokens.remote(self._limits_json, tenant, tokens))

    def record(self, tenant: str | None, model: str, usage: Usage, reserved_tokens: float = 0,
               latency_s: float | None = None) -> Awaitable[None]:
        cached = usage.prompt_tokens_details.cached_tokens
        if self.metrics is not None:
            self.metrics.on_usage(tenant, model, usage.prompt_tokens, usage.completion_tokens, cached)
        settle = (self._limits_json, tenant, reserved_tokens, usage.total_tokens) if reserved_tokens else None
        if self.metering:
            ref = self.service.record.remote(
                [inference_record(tenant, model, usage.prompt_tokens, usage.completion_tokens, cached,
                                  latency_s=latency_s)], settle)
        elif settle is not None:
            ref = self.service.settle.remote(settle)
        else:
            return asyncio.sleep(0)
        return self._stored(ref)

    def release(self, tenant: str | None, reserved_tokens: float) -> None:
        """A request that failed before it could be metered gives its whole token reservation back."""
        if reserved_tokens:
            self.service.settle.remote((self._limits_json, tenant, reserved_tokens, 0))

    @staticmethod
    async def _stored(ref: ray.ObjectRef) -> None:
        try:
            await asyncio.wait_for(asyncio.wrap_future(ref.future()), RECORD_TIMEOUT_S)
        except Exception as exc:  # metering never fails a request that was answered
            logger.warning("usage record not confirmed: %s", exc)


async def _answer(ref: ray.ObjectRef):
    """The actor's answer; its own errors (a 429) raised as themselves, not wrapped in Ray's; the actor gone
    (restarting) is a 503, as a limit that cannot be checked is not waived."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), LIMIT_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ServiceUnavailable("the rate-limit service did not answer in time; retry",
                                 code="limits_unavailable") from None
    except Exception as exc:
        inner = unwrap(exc)
        if isinstance(inner, APIError):
            raise inner from None
        raise ServiceUnavailable(f"the rate-limit service is unavailable ({type(inner).__name__}); retry",
                                 code="limits_unavailable") from None
