"""The one naming rule: adapter names, tenant ids and the reserved name of the base model."""
from __future__ import annotations

import re

NAME_PATTERN = r"^[a-z0-9][a-z0-9\-_.]{0,63}$"  # safe as one path component and in a model id ("name@3")
NAME_RE = re.compile(NAME_PATTERN)
BASE_ALIAS = "base"  # always names the served base model, so no adapter may take it


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an adapter, or None when it can."""
    if not NAME_RE.match(name):
        return f"{name!r} is invalid: use [a-z0-9][a-z0-9-_.]{{0,63}}"
    if name == BASE_ALIAS:
        return f"{name!r} is reserved for the base model"
    return None
