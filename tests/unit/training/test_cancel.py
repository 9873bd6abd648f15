"""Cancellation and publication of a job are ordered: whichever comes first wins, the other is refused."""
from __future__ import annotations

import threading

import pytest

from llmaas.training import jobs
from llmaas.training.config import FineTuneJob
from llmaas.training.jobs import cancel_job, run_job
from llmaas.training.store import JobRecord, JobStore


def test_a_cancel_racing_the_publish_claim_never_both_win(tmp_path):
    store = JobStore(tmp_path)
    for i in range(40):
        job_id = f"ftjob-race-{i}"
        store.save(JobRecord(id=job_id, job={}, status="running"))
        start, won = threading.Barrier(2), {}

        def publish():
            start.wait()
            won["publish"] = store.update_if(job_id, lambda r: not r.cancel_requested, publishing=True) is not None

        def cancel():
            start.wait()
            won["cancel"] = cancel_job(store, job_id, None).status == "cancelled"

        threads = [threading.Thread(target=publish), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert won["publish"] != won["cancel"], won  # exactly one of them (which one is up to the scheduler)


@pytest.fixture
def job(tmp_path):
    return FineTuneJob(name="x", train_files=["unused.jsonl"], storage_root=tmp_path)


def test_cancelled_before_publishing_nothing_is_registered(job, monkeypatch):
    store = JobStore(job.storage_root)
    registered = []

    def trained_then_cancelled(job, job_id, store):  # training ends just as the user cancels
        assert cancel_job(store, job_id, None).status == "cancelled"
        return store.get(job_id)

    monkeypatch.setattr(jobs, "_run", trained_then_cancelled)
    record = run_job(job, "ftjob-cancel-first", on_success=lambda r: registered.append(r) or r)
    assert registered == [] and record.status == "cancelled" == store.get("ftjob-cancel-first").status


def test_a_cancel_during_publishing_is_refused_and_the_job_succeeds(job, monkeypatch):
    store = JobStore(job.storage_root)
    monkeypatch.setattr(jobs, "_run", lambda job, job_id, store: store.get(job_id))

    def register(record):  # the user cancels while the adapter is being registered
        assert cancel_job(store, record.id, None).status == "running"
        return record

    record = run_job(job, "ftjob-publish-first", on_success=register)
    assert record.status == "succeeded" and not record.cancel_requested
    assert any("cancel refused" in e["message"] for e in store.events("ftjob-publish-first"))
