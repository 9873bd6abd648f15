"""Usage metering: what each tenant used, per model version: the ledger, free of Ray.

Every answered request adds one record (its ``usage``: prompt, completion and cached tokens) and every
finished fine-tuning job one more (tokens x epochs trained, worker-seconds of compute). Records are kept
in segments on the storage root, ``usage/<start ns>-<writer>.jsonl``: the ledger's writer rewrites its
current segment atomically with each commit (so a crash loses nothing committed and never leaves half a
line) and starts a new one past ``SEGMENT_RECORDS``. Every writer names its own segments, so two never
clash. Queries read per-minute totals kept in memory, rebuilt from the segments at start.
"""
from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Literal

from llmaas.app.errors import InvalidRequest
from llmaas.app.rate_limit import month_key
from llmaas.app.storage import Storage, open_storage

PREFIX = "usage"
SEGMENT_RECORDS = 2000  # records per segment before the next one starts (bounds each commit's rewrite)
GROUPS = ("tenant", "model", "kind")
BUCKETS = {"1m": 60, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 10_000  # time buckets one query may ask for (a week of minutes, a year of hours): the answer stays small
Kind = Literal["inference", "training"]
GroupKey = Literal["tenant", "model", "kind"]


@dataclass(slots=True)
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    training_tokens: int = 0
    training_compute_s: float = 0.0
    latency_s: float = 0.0  # answered requests' end-to-end seconds, summed
    timed_requests: int = 0  # requests that carry a latency (records from before it was metered do not)

    def add(self, other: Counts) -> None:
        for f in fields(Counts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["total_tokens"] = self.prompt_tokens + self.completion_tokens
        out["training_compute_s"] = round(self.training_compute_s, 3)
        out["latency_s"] = round(self.latency_s, 3)
        out["avg_latency_ms"] = round(1000 * self.latency_s / self.timed_requests, 1) if self.timed_requests else None
        return out


@dataclass(slots=True)
class UsageRecord:
    """One metered event: a request answered, or a fine-tuning job finished."""

    t: float  # unix seconds
    tenant: str | None  # None: no key (auth off) or a trusted handle caller
    model: str  # the model version that served (``name@v``), the base model's name, or the job's adapter
    kind: Kind
    counts: Counts

    def to_json(self) -> str:
        return json.dumps({"t": round(self.t, 3), "tenant": self.tenant, "model": self.model, "kind": self.kind,
                           **{k: v for k, v in asdict(self.counts).items() if v}}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> UsageRecord:
        d = json.loads(line)
        return cls(d["t"], d["tenant"], d["model"], d["kind"],
                   Counts(**{f.name: d.get(f.name, 0) for f in fields(Counts)}))


def inference_record(tenant: str | None, model: str, prompt_tokens: int, completion_tokens: int,
                     cached_tokens: int, t: float | None = None, latency_s: float | None = None) -> UsageRecord:
    """``latency_s``: the request's end-to-end seconds (a response-cache hit's too: it was answered that fast)."""
    return UsageRecord(time.time() if t is None else t, tenant, model, "inference",
                       Counts(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              cached_tokens=cached_tokens, latency_s=latency_s or 0.0,
                              timed_requests=int(latency_s is not None)))


def training_record(tenant: str | None, model: str, training_tokens: int, compute_s: float,
                    t: float | None = None) -> UsageRecord:
    return UsageRecord(time.time() if t is None else t, tenant, model, "training",
                       Counts(training_tokens=training_tokens, training_compute_s=compute_s))


def parse_time(value: str | float | int | None, param: str) -> float | None:
    """A query bound: unix seconds or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        pass
    else:
        if not math.isfinite(seconds) or abs(seconds) > 1e12:
            raise InvalidRequest(f"{param} must be a time, got {value!r}", param=param)
        return seconds
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{param} must be unix seconds or an ISO 8601 time, got {value!r}",
                             param=param) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def parse_group_by(value: str | None) -> tuple[GroupKey, ...]:
    keys = tuple(k.strip() for k in (value or "tenant,model").split(",") if k.strip())
    bad = [k for k in keys if k not in GROUPS]
    if bad:
        raise InvalidRequest(f"group_by takes a comma list of {', '.join(GROUPS)}; not {', '.join(bad)}",
                             param="group_by")
    return keys  # type: ignore[return-value]


def check_bucket(value: str | None) -> str | None:
    if value is not None and value not in BUCKETS:
        raise InvalidRequest(f"bucket_width is one of {', '.join(BUCKETS)}; got {value!r}", param="bucket_width")
    return value


class UsageLedger:
    """The records of one storage root: ``add`` (memory), ``commit`` (storage), ``query`` (memory).

    One writer per storage root at a time (the cluster's UsageService actor); readers of other clusters on the
    same root see its commits when they load. ``add`` and ``query`` run on one thread, ``commit`` may run on
    another (a commit writes a snapshot: records added meanwhile go out with the next one).
    """

    def __init__(self, storage: Storage | str, segment_records: int = SEGMENT_RECORDS) -> None:
        self.storage = open_storage(storage)
        self.segment_records = segment_records
        self._minutes: dict[tuple[int, str | None, str, str], Counts] = defaultdict(Counts)
        self._months: dict[tuple[str | None, str], int] = defaultdict(int)  # inference tokens per tenant, month
        self._lock = threading.Lock()  # the segment, between add and a commit in another thread
        self._segment: list[str] = []  # the current segment's lines, committed or not
        self._segment_key = self._new_key()
        self._written = 0  # lines of the current segment on storage
        self.loaded = self._load()

    @staticmethod
    def _new_key() -> str:
        return f"{PREFIX}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"

    def _load(self) -> int:
        n = 0
        for key in self.storage.list(PREFIX):
            for line in self.storage.read(key).decode().splitlines():
                if line.strip():
                    self._count(UsageRecord.from_json(line))
                    n += 1
        return n

    def _count(self, record: UsageRecord) -> None:
        self._minutes[(int(record.t // 60), record.tenant, record.model, record.kind)].add(record.counts)
        self._months[(record.tenant, month_key(record.t))] += record.counts.prompt_tokens + \
            record.counts.completion_tokens

    def month_tokens(self, tenant: str | None, t: float | None = None) -> int:
        """Prompt + completion tokens metered to ``tenant`` in the calendar month (UTC) of ``t`` (default: now)."""
        return self._months.get((tenant, month_key(time.time() if t is None else t)), 0)

    def add(self, records: list[UsageRecord]) -> None:
        """Counts the records at once (queries see them) and queues them for the next commit."""
        lines = [r.to_json() for r in records]
        for r in records:
            self._count(r)
        with self._lock:
            self._segment += lines

    def commit(self) -> None:
        """Writes the current segment: every record added before the call is then stored. Raises if storage
        fails; the next commit writes the same records again."""
        with self._lock:
            lines, key = list(self._segment), self._segment_key
        if len(lines) == self._written:
            return
        self.storage.write(key, ("\n".join(lines) + "\n").encode())  # atomic: the old segment or the new
        with self._lock:
            self._written = len(lines)
            if self._written >= self.segment_records:  # full: the next records start a new segment
                self._segment, self._segment_key, self._written = self._segment[self._written:], self._new_key(), 0

    def query(self, start: float | None = None, end: float | None = None, tenant: str | None = None,
              all_tenants: bool = True, group_by: tuple[GroupKey, ...] = ("tenant", "model"),
              bucket: str | None = None) -> dict:
        """Totals of records with ``start <= t < end`` (whole minutes: start rounds down, end up), grouped.

        Args:
            tenant, all_tenants: whose records count: everyone's, or only ``tenant``'s.
            group_by: which of tenant / model / kind split the rows.
            bucket: '1m', '1h' or '1d' splits rows by time too; None: one row per group for the whole range.
        """
        check_bucket(bucket)
        lo = -math.inf if start is None else math.floor(start / 60)
        hi = math.inf if end is None else math.ceil(end / 60)
        width = BUCKETS[bucket] // 60 if bucket else None
        if width is not None:
            minutes = [m for m, *_ in self._minutes]
            first = lo if start is not None else min(minutes, default=0)
            last = hi if end is not None else max(minutes, default=0) + 1
            if (last - first) / width > MAX_BUCKETS:
                raise InvalidRequest(f"{bucket} buckets over this range would be more than {MAX_BUCKETS}; give a "
                                     f"narrower start / end or a wider bucket_width", param="bucket_width")
        rows: dict[tuple, Counts] = defaultdict(Counts)
        total = Counts()
        for (minute, who, model, kind), counts in list(self._minutes.items()):
            if not (lo <= minute < hi) or (not all_tenants and who != tenant):
                continue
            values = {"tenant": who, "model": model, "kind": kind}
            key = (minute // width * width if width else None, *(values[g] for g in group_by))
            rows[key].add(counts)
            total.add(counts)
        data = []
        for key in sorted(rows, key=lambda k: tuple((v is None, v) for v in k)):
            row: dict = dict(zip(group_by, key[1:]))
            if width:
                row["start_time"], row["end_time"] = key[0] * 60, (key[0] + width) * 60
            data.append({"object": "usage.result", **row, **rows[key].as_dict()})
        return {"object": "list", "start": start, "end": end, "group_by": list(group_by), "bucket_width": bucket,
                "data": data, "total": total.as_dict()}
