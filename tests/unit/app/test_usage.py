"""The usage ledger: exact totals, crash-safe segments, queries by tenant, model, kind and time."""
from __future__ import annotations

import json

import pytest

from llmaas.app.errors import InvalidRequest
from llmaas.app.storage import LocalStorage
from llmaas.app.usage import UsageLedger, UsageRecord, inference_record, parse_group_by, parse_time, training_record

T0 = 1_700_000_000.0  # a minute boundary plus 20 s


def test_totals_are_exact_and_survive_a_new_ledger_on_the_same_storage(tmp_path):
    ledger = UsageLedger(tmp_path)
    ledger.add([inference_record("a", "m@1", 10, 5, 3, t=T0), inference_record("a", "m@1", 7, 2, 0, t=T0 + 1),
                inference_record("b", "base", 4, 4, 0, t=T0 + 2)])
    ledger.add([training_record("a", "m@2", 1200, 12.5, t=T0 + 3)])
    ledger.commit()
    expected = ledger.query()
    again = UsageLedger(tmp_path)  # a restarted service reads what was committed
    assert again.loaded == 4
    assert again.query() == expected
    rows = {(r["tenant"], r["model"]): r for r in expected["data"]}
    assert rows[("a", "m@1")] | {} == {"object": "usage.result", "tenant": "a", "model": "m@1", "requests": 2,
                                       "prompt_tokens": 17, "completion_tokens": 7, "cached_tokens": 3,
                                       "training_tokens": 0, "training_compute_s": 0.0, "total_tokens": 24,
                                       "latency_s": 0.0, "timed_requests": 0, "avg_latency_ms": None}
    assert rows[("a", "m@2")]["training_tokens"] == 1200 and rows[("a", "m@2")]["training_compute_s"] == 12.5
    assert rows[("a", "m@2")]["requests"] == 0
    assert expected["total"]["prompt_tokens"] == 21 and expected["total"]["requests"] == 3


def test_only_committed_records_are_stored_and_a_failed_commit_is_retried(tmp_path):
    ledger = UsageLedger(tmp_path)
    ledger.add([inference_record("a", "m", 1, 1, 0, t=T0)])
    assert UsageLedger(tmp_path).loaded == 0  # added, not yet committed
    ledger.commit()

    broken = {"on": True}
    write = ledger.storage.write

    def flaky(key, data):
        if broken["on"]:
            raise OSError("disk gone")
        write(key, data)

    ledger.storage.write = flaky
    ledger.add([inference_record("a", "m", 2, 2, 0, t=T0)])
    with pytest.raises(OSError):
        ledger.commit()
    assert UsageLedger(tmp_path).loaded == 1  # the stored segment is the old one, whole
    broken["on"] = False
    ledger.commit()
    assert UsageLedger(tmp_path).query()["total"]["prompt_tokens"] == 3


def test_full_segments_roll_over_and_every_line_is_whole_json(tmp_path):
    ledger = UsageLedger(tmp_path, segment_records=3)
    for i in range(7):
        ledger.add([inference_record("a", "m", i, 1, 0, t=T0 + i)])
        ledger.commit()
    keys = LocalStorage(tmp_path).list("usage")
    assert len(keys) == 3  # 3 + 3 + 1
    lines = [ln for k in keys for ln in (tmp_path / k).read_text().splitlines()]
    assert [json.loads(ln)["prompt_tokens"] for ln in lines if "prompt_tokens" in json.loads(ln)] == [1, 2, 3, 4, 5, 6]
    assert UsageLedger(tmp_path).query()["total"]["completion_tokens"] == 7


def test_two_writers_never_overwrite_each_other(tmp_path):
    one, two = UsageLedger(tmp_path), UsageLedger(tmp_path)
    one.add([inference_record("a", "m", 1, 0, 0, t=T0)])
    two.add([inference_record("b", "m", 2, 0, 0, t=T0)])
    one.commit()
    two.commit()
    assert UsageLedger(tmp_path).query()["total"]["prompt_tokens"] == 3


def test_queries_filter_by_tenant_and_time_and_group_and_bucket(tmp_path):
    ledger = UsageLedger(tmp_path)
    ledger.add([inference_record("a", "m", 1, 0, 0, t=T0), inference_record("a", "n", 10, 0, 0, t=T0 + 3600),
                inference_record("b", "m", 100, 0, 0, t=T0 + 7200), training_record("a", "m", 50, 1.0, t=T0)])
    assert ledger.query(tenant="a", all_tenants=False)["total"]["prompt_tokens"] == 11
    assert ledger.query(tenant=None, all_tenants=False)["data"] == []  # a tenant-less caller sees no one's
    assert ledger.query(start=T0 + 1800)["total"]["prompt_tokens"] == 110
    assert ledger.query(end=T0 + 3540)["total"]["prompt_tokens"] == 1  # end is exclusive, by whole minutes
    assert ledger.query(end=T0 + 3600)["total"]["prompt_tokens"] == 11  # (its own minute counts)
    assert ledger.query(start=T0, end=T0 + 1)["total"]["prompt_tokens"] == 1  # a record inside its minute counts
    by_kind = {r["kind"]: r for r in ledger.query(group_by=("kind",))["data"]}
    assert by_kind["training"]["training_tokens"] == 50 and by_kind["inference"]["prompt_tokens"] == 111
    hourly = ledger.query(group_by=(), bucket="1h")["data"]
    assert [r["prompt_tokens"] for r in hourly] == [1, 10, 100]
    assert all(r["end_time"] - r["start_time"] == 3600 and r["start_time"] % 3600 == 0 for r in hourly)
    with pytest.raises(InvalidRequest) as e:
        ledger.query(bucket="1w")
    assert e.value.param == "bucket_width"
    assert len(ledger.query(bucket="1m")["data"]) == 3  # two hours of minutes: fine
    with pytest.raises(InvalidRequest) as e:  # a year of minutes: far more than one answer should hold
        ledger.query(start=T0, end=T0 + 365 * 86400, bucket="1m")
    assert e.value.param == "bucket_width"


def test_query_parameters_are_checked():
    assert parse_time("1700000000", "start") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20Z", "start") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20", "start") == 1_700_000_000.0  # no zone: UTC
    assert parse_time(None, "end") is None
    with pytest.raises(InvalidRequest) as e:
        parse_time("yesterday", "end")
    assert e.value.param == "end"
    assert parse_group_by(None) == ("tenant", "model")
    assert parse_group_by("kind, model") == ("kind", "model")
    with pytest.raises(InvalidRequest):
        parse_group_by("tenant,secret")


def test_latency_per_model_version_is_the_mean_of_its_requests_and_survives_a_reload(tmp_path):
    ledger = UsageLedger(tmp_path)
    ledger.add([inference_record("a", "tone@1", 5, 5, 0, t=T0, latency_s=0.2),
                inference_record("b", "tone@1", 5, 5, 0, t=T0, latency_s=0.4),
                inference_record("a", "tone@2", 5, 5, 0, t=T0, latency_s=1.0),
                training_record("a", "tone@2", 50, 1.0, t=T0)])
    ledger.commit()
    for reader in (ledger, UsageLedger(tmp_path)):
        rows = {r["model"]: r for r in reader.query(group_by=("model",))["data"]}
        assert rows["tone@1"]["avg_latency_ms"] == 300.0 and rows["tone@1"]["latency_s"] == 0.6
        assert rows["tone@2"]["avg_latency_ms"] == 1000.0  # the training record adds no request
    old = UsageRecord.from_json('{"t": 1, "tenant": "a", "model": "tone@1", "kind": "inference", "requests": 1}')
    assert old.counts.timed_requests == 0  # a record from before latency was metered
    ledger.add([old])
    rows = {r["model"]: r for r in ledger.query(group_by=("model",))["data"]}
    assert rows["tone@1"]["requests"] == 3 and rows["tone@1"]["avg_latency_ms"] == 300.0  # it does not lower it
    by_kind = {r["kind"]: r for r in ledger.query(group_by=("kind",))["data"]}
    assert by_kind["training"]["avg_latency_ms"] is None  # no requests: no latency to speak of
