"""How many Ray Train workers a job gets, and waiting for them with a deadline.

A job that asks for more than the cluster can give must not wait forever: Ray
Train's own worker-group start is retried without limit, and nothing tells the user.
So the job (1) plans its workers from what the cluster has free *now* while serving
keeps running (``plan_workers``, pure), then (2) reserves that plan as a placement
group and waits for it, reporting "waiting for resources" within seconds and failing
with ``ResourcesUnavailable`` after ``resource_wait_s`` (``reserve``). Only then does
the TorchTrainer start, with the reservation released a moment before.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group

DEFAULT_WORKERS = 2  # DDP over two workers: what the README's job and its timings assume
MIN_CPUS_PER_WORKER = 0.1  # below this a worker's share is too thin to be worth scheduling
CPU_GRAIN = 0.05  # auto shares are rounded down to this so fractions sum without float dust
POLL_S = 2.0  # how often a waiting job re-checks and re-reports what is free


class ResourcesUnavailable(RuntimeError):
    """The job's workers could not be placed (never, or not within its wait)."""


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    reason: str  # said in the job's events: why these numbers

    @property
    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            b["GPU"] = self.gpus_per_worker
        return b

    def describe(self) -> str:
        return f"{self.num_workers} worker(s) x {_fmt(self.bundle)}"


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))


def _floor(x: float) -> float:
    return math.floor(x / CPU_GRAIN + 1e-9) * CPU_GRAIN


def plan_workers(free_cpus: float, free_gpus: float, num_workers: int | None, cpus_per_worker: float | None,
                 use_gpu: bool) -> WorkerPlan:
    """Workers and per-worker resources for a job, from what the cluster has free.

    Explicit settings are kept as given. Left unset (auto): ``DEFAULT_WORKERS`` workers
    (or one per free GPU), each with an equal share of the free CPUs, at most 1; on a
    node where that share is too thin, one worker takes what is free. When nothing is
    free the plan is the smallest one, which then waits for resources.
    """
    gpus = 1.0 if use_gpu else 0.0
    if num_workers is not None and cpus_per_worker is not None:
        return WorkerPlan(num_workers, cpus_per_worker, gpus, "set explicitly")
    workers = num_workers or (max(1, min(DEFAULT_WORKERS, int(free_gpus))) if use_gpu else DEFAULT_WORKERS)
    if cpus_per_worker is not None:
        return WorkerPlan(workers, cpus_per_worker, gpus, f"{cpus_per_worker:g} CPU per worker set explicitly")
    share = min(1.0, _floor(free_cpus / workers))
    if share < MIN_CPUS_PER_WORKER and num_workers is None and workers > 1:
        workers, share = 1, min(1.0, _floor(free_cpus))
    if share < MIN_CPUS_PER_WORKER:
        return WorkerPlan(workers, MIN_CPUS_PER_WORKER, gpus,
                          f"{free_cpus:g} CPU free now: the smallest plan, waiting for room")
    return WorkerPlan(workers, share, gpus, f"fits the {free_cpus:g} CPU the cluster has free")


def infeasible_reason(plan: WorkerPlan, total: dict[str, float]) -> str | None:
    """Why ``plan`` can never be placed on a cluster of ``total`` resources (None if it could)."""
    for key, per_worker in plan.bundle.items():
        have = total.get(key, 0.0)
        if per_worker * plan.num_workers > have + 1e-9:
            return f"needs {plan.describe()} but the whole cluster has {key} {have:g}"
    return None


def free_resources() -> dict[str, float]:
    """Free CPUs (and GPUs, on a cluster that has any) right now."""
    free = ray.available_resources()
    keys = ("CPU", "GPU") if "GPU" in ray.cluster_resources() else ("CPU",)
    return {k: free.get(k, 0.0) for k in keys}


def reserve(plan: WorkerPlan, strategy: str, wait_s: float, on_wait: Callable[[str], None]) -> None:
    """Blocks until the cluster can place ``plan`` (then releases the reservation for the trainer).

    Raises ResourcesUnavailable at once when the cluster is too small for it, or after
    ``wait_s`` seconds of waiting; ``on_wait`` hears "waiting for resources: needs …,
    free …" after the first poll and whenever what is free changes.
    """
    total = ray.cluster_resources()
    never = infeasible_reason(plan, total)
    if never is not None:
        raise ResourcesUnavailable(f"cannot place the job's workers: {never}; set fewer workers or a smaller "
                                   "cpus_per_worker")
    pg = placement_group([plan.bundle] * plan.num_workers, strategy=strategy)
    try:
        deadline = time.monotonic() + wait_s
        said = None
        while not pg.wait(timeout_seconds=max(0.0, min(POLL_S, deadline - time.monotonic()))):
            free = _fmt(free_resources())
            if free != said:
                on_wait(f"waiting for resources: needs {plan.describe()}, free {free}")
                said = free
            if time.monotonic() >= deadline:
                raise ResourcesUnavailable(
                    f"waited {wait_s:g} s for {plan.describe()} (free: {free}); the cluster is busy with "
                    "serving or other jobs. Retry later, or ask for fewer workers or CPUs")
    finally:
        remove_placement_group(pg)
