"""`llmaas finetune job.yaml`: run a fine-tuning job with a progress bar, then print metrics and plot the loss."""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import yaml


def plot_loss(events: list[dict]) -> bytes | None:
    """The loss curve as a PNG, or None without metrics or without matplotlib (an optional dependency)."""
    points = [(e["data"]["step"], e["data"]["train_loss"]) for e in events if e["type"] == "metrics"]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter on Ray Train (progress bar, loss curve)")
    p.add_argument("job", help="job.yaml (fields: llmaas.training.FineTuneJob)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a top-level field, e.g. --set epochs=2")


def run(args: argparse.Namespace) -> int:
    # Ray Train, torch and transformers load here, not when the `llmaas` command starts: `llmaas adapters ...`
    # (an HTTP client) would otherwise pay ~7 s of imports on every call.
    import ray

    from llmaas.training.config import FineTuneJob
    from llmaas.training.jobs import run_job
    from llmaas.training.store import JobStore, new_job_id

    raw = yaml.safe_load(Path(args.job).read_text()) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        raw[key] = yaml.safe_load(value)
    job = FineTuneJob.model_validate(raw)
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    job_id = new_job_id()
    print(f"job {job_id}: fine-tuning '{job.name}' on {job.base_model} with {job.num_workers or 'auto'} worker(s)")
    record = run_job(job, job_id)
    store = JobStore(job.storage_root)
    png = plot_loss(store.events(job_id))
    curve = None
    if png is not None:
        store.storage.write(f"job-plots/{job_id}/loss.png", png)
        curve = store.storage.url(f"job-plots/{job_id}/loss.png")
    print(f"\nstatus: {record.status}")
    if record.error:
        print(f"error: {record.error}")
        return 1
    print(f"adapter: {record.adapter_dir}")
    names = sorted(set(record.metrics) | set(record.metrics_before))
    print(f"{'metric':<12}{'base':>10}{'adapter':>10}")
    for n in names:
        print(f"{n:<12}{record.metrics_before.get(n, float('nan')):>10.4f}{record.metrics.get(n, float('nan')):>10.4f}")
    print(f"eval thresholds {'met' if record.eval_passed else 'missed'}")
    if curve:
        print(f"loss curve: {curve}")
    return 0
