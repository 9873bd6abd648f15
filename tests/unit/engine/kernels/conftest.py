from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _interpreter_fixes(request):
    """Interpreter patches for the tests that run kernels (not for the sm_90 compile test: the compiler calls
    the same JITFunction objects the patch reroutes)."""
    if not getattr(request.module, "RUNS_IN_INTERPRETER", True):
        yield
        return
    from .interpreter import interpreter_fixes  # skips the module's tests where triton is not installed

    with interpreter_fixes():
        yield
