from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _interpreter_fixes():
    from .interpreter import interpreter_fixes  # skips the module's tests where triton is not installed

    with interpreter_fixes():
        yield
