"""Runs our Triton kernels on CPU tensors under Triton's interpreter, with its known bugs worked around.

``interpreted(name)`` loads a fresh copy of ``engine/kernels/<name>.py`` with ``TRITON_INTERPRET=1`` set while
its ``@triton.jit`` decorators run (that is when Triton picks interpreter or compiler), so the normal import
of the same module stays compilable for sm_90 in the same session.

Interpreter bugs (Triton 3.6, see DESIGN.md) and what we do about them (``interpreter_fixes``):
- Triton's own ``@triton.jit`` library functions (``tl.cdiv``, ``tl.sum``, ``tl.max``...) are compiled-mode
  objects once triton was imported without ``TRITON_INTERPRET`` (as here, by torch or the compile test), and
  refuse to be called from an interpreted kernel: they are run through the interpreter like our own.
- a nested ``@triton.jit`` call patches ``triton.language`` for the interpreter and never restores it, which
  breaks compiling kernels later in the same process: nested calls restore what they patched.
- bf16 ``tl.dot`` multiplies the raw uint16 bits: the fix patches the interpreter's dot to widen
  bf16 operands to float32 first (exact: bf16 is the top half of a float32). The kernels already do every
  other bf16 computation in float32, which the GPU does too (bf16 elementwise arithmetic in the
  interpreter is broken the same way).
- float32 -> bf16 casts truncate instead of rounding: bf16 results are compared with a tolerance of a few ulp.
- integer -> bf16 casts store the integer as bf16's raw bits: the fix casts through float32.
- numpy >= 2.4 breaks loop bounds loaded from memory: the test extras pin numpy below 2.4.
- an unmasked out-of-bounds load segfaults: every load in the kernels is masked or provably in bounds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (test extras)")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[4] / "engine" / "kernels"


def interpreted(name: str) -> ModuleType:
    """A copy of ``engine/kernels/<name>.py`` whose kernels run in the interpreter on CPU tensors."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(f"interpreted_kernels_{name}", KERNELS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def _as_float32(handle) -> np.ndarray:
    if handle.dtype == tl.bfloat16:  # stored as the raw uint16 bits
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


@contextlib.contextmanager
def interpreter_fixes() -> Iterator[None]:
    """Patches the interpreter's ``tl.dot`` to multiply bf16 operands as numbers, not bit patterns, and its
    integer -> bf16 casts to give the number, lets
    interpreted kernels call compiled-mode library functions, and makes nested calls undo their patches."""
    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot
    as_interpreted: dict[object, interpreter.InterpretedFunction] = {}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype != tl.bfloat16 and b.dtype != tl.bfloat16:
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = np.matmul(_as_float32(a), _as_float32(b), dtype=d.data.dtype)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    def int_to_fp(self, src, dst_type):
        # the interpreter casts an integer to bf16 by numpy astype into bf16's uint16 storage (the integer as
        # raw bits): go through float32, whose cast to bf16 it does right
        if dst_type.scalar == tl.bfloat16:
            src = interpreter.TensorHandle(src.data.astype(np.float32), tl.float32)
        return self.cast_impl(src, dst_type)

    def call(self, *args, **kwargs):
        if self.fn not in as_interpreted:
            as_interpreted[self.fn] = interpreter.InterpretedFunction(self.fn)
        return as_interpreted[self.fn](*args, **kwargs)

    def nested_call(self, *args, **kwargs):
        scope = interpreter._patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e
        finally:
            scope.restore()

    patched = [(builder, "create_dot", create_dot), (builder, "create_si_to_fp", int_to_fp),
               (builder, "create_ui_to_fp", int_to_fp), (JITFunction, "__call__", call),
               (interpreter.InterpretedFunction, "__call__", nested_call)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, value in patched:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)
