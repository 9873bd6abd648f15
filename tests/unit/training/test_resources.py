"""Planning a job's Ray Train workers from what the cluster has free (pure: no Ray cluster needed)."""
from __future__ import annotations

import pytest

from llmaas.training.resources import WorkerPlan, infeasible_reason, plan_workers


@pytest.mark.parametrize("free_cpus, num_workers, cpus_per_worker, expect", [
    (6.0, None, None, (2, 1.0)),          # a roomy node: the default two workers, one CPU each
    (0.8, None, None, (2, 0.4)),          # make serve on 2 cores: serving holds 1.2 CPU, the job shares the rest
    (0.15, None, None, (1, 0.15)),        # too thin for two: one worker takes what is free
    (0.0, None, None, (1, 0.1)),          # nothing free: the smallest plan (one thin worker), which then waits
    (0.8, 4, None, (4, 0.2)),             # workers set, CPUs shared among them
    (0.1, 4, None, (4, 0.1)),             # workers set and nothing to share: kept, smallest share
    (0.8, None, 1.0, (2, 1.0)),           # CPUs set: kept even if they do not fit now
    (0.8, 3, 0.5, (3, 0.5)),              # both set: exactly as asked
    (1.0 / 3, None, None, (2, 0.15)),     # shares round down to the 0.05 grain, never above what is free
])
def test_plan_fits_what_is_free(free_cpus, num_workers, cpus_per_worker, expect):
    plan = plan_workers(free_cpus, 0.0, num_workers, cpus_per_worker, use_gpu=False)
    assert (plan.num_workers, plan.cpus_per_worker) == pytest.approx(expect)
    assert plan.gpus_per_worker == 0 and "GPU" not in plan.bundle
    if num_workers is None and cpus_per_worker is None and free_cpus >= 0.1:
        assert plan.num_workers * plan.cpus_per_worker <= free_cpus + 1e-9


@pytest.mark.parametrize("free_gpus, expect_workers", [(4.0, 2), (1.0, 1), (0.0, 1)])
def test_gpu_plan_takes_one_gpu_per_worker(free_gpus, expect_workers):
    plan = plan_workers(8.0, free_gpus, None, None, use_gpu=True)
    assert plan.num_workers == expect_workers and plan.bundle == {"CPU": 1.0, "GPU": 1.0}


@pytest.mark.parametrize("plan, total, fragment", [
    (WorkerPlan(2, 64.0, 0.0, ""), {"CPU": 2.0}, "whole cluster has CPU 2"),
    (WorkerPlan(2, 1.0, 1.0, ""), {"CPU": 8.0}, "whole cluster has GPU 0"),
    (WorkerPlan(3, 1.0, 0.0, ""), {"CPU": 2.0}, "needs 3 worker(s) x CPU 1"),
])
def test_plans_the_cluster_can_never_hold_are_named(plan, total, fragment):
    assert fragment in infeasible_reason(plan, total)


def test_a_plan_that_fits_the_cluster_is_feasible():
    assert infeasible_reason(WorkerPlan(2, 1.0, 0.0, ""), {"CPU": 2.0}) is None
