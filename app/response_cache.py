"""Optional LRU cache of deterministic completions (temperature 0, or a fixed seed).

Keyed by (tenant, resolved model version, normalized request), so a hit can never
cross tenants or serve an old adapter version after an alias moves. Off by default.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @staticmethod
    def key(tenant: str | None, model_version: str, request: dict[str, Any]) -> str | None:
        """None when the request is not deterministic (sampling without a seed)."""
        if request.get("temperature", 1.0) != 0 and request.get("seed") is None and request.get("top_k") != 1:
            return None
        body = {k: v for k, v in request.items() if k not in ("model", "stream", "stream_options", "user")}
        return json.dumps([tenant, model_version, body], sort_keys=True, separators=(",", ":"))

    def get(self, key: str | None) -> Any | None:
        if key is None or not self.enabled:
            return None
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str | None, value: Any) -> None:
        if key is None or not self.enabled:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
