"""Job records: compare-and-set updates, and jobs written by older releases stay readable."""
from __future__ import annotations

import json

from llmaas.training.store import JobRecord, JobStore


def test_jobs_in_the_older_layout_are_listed_and_updated_in_the_new_one(tmp_path):
    old = tmp_path / "jobs" / "ftjob-old"
    old.mkdir(parents=True)
    (old / "record.json").write_text(JobRecord(id="ftjob-old", job={}, status="running").model_dump_json())
    (old / "events.jsonl").write_text(json.dumps({"type": "status", "message": "job started", "data": {},
                                                  "created_at": 1}) + "\n{torn")
    store = JobStore(tmp_path)
    store.save(JobRecord(id="ftjob-new", job={}))
    assert {r.id for r in store.list()} == {"ftjob-old", "ftjob-new"}
    assert [e["message"] for e in store.events("ftjob-old")] == ["job started"]
    store.add_event("ftjob-old", "status", "job failed")
    assert [e["message"] for e in store.events("ftjob-old")] == ["job started", "job failed"]
    assert store.update("ftjob-old", status="failed").finished_at is not None
    assert store.get("ftjob-old").status == "failed"


def test_update_if_is_a_compare_and_set(tmp_path):
    store = JobStore(tmp_path)
    store.save(JobRecord(id="ftjob-a", job={}))
    claim = lambda r: not r.cancel_requested  # noqa: E731
    assert store.update_if("ftjob-a", claim, cancel_requested=True) is not None
    assert store.update_if("ftjob-a", claim, cancel_requested=True) is None  # the second claim gets nothing
