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


@pytest.fixture(scope="session")
def _kernel_copies():
    from .interpreter import interpreted

    return {name: interpreted(name) for name in ("layers", "paged_attention", "quant_matmul", "sampling", "sgmv")}


@pytest.fixture
def interpreted_kernels(_kernel_copies, monkeypatch):
    """The CUDA path's forward (engine/triton_model.py) runs its kernels in the interpreter, on CPU tensors: the
    custom ops it calls (engine/kernels/ops.py) and the device sampler (engine/device_sampling.py) launch the
    interpreted copies."""
    from llmaas.engine import device_sampling
    from llmaas.engine.kernels import ops

    for name, module in _kernel_copies.items():
        if name == "sampling":
            monkeypatch.setattr(device_sampling, name, module)
        else:
            monkeypatch.setattr(ops, name, module)


@pytest.fixture
def cuda_quantized_layout(monkeypatch):
    """Quantized modules built on CPU as the CUDA path builds them: int4 in plain nibbles (what the Triton GEMM
    reads), and 8 SMs, so decode steps split K."""
    from llmaas.engine import quantization

    monkeypatch.setattr(quantization, "int4_block_for", lambda q, device=None: 0)
    monkeypatch.setattr(quantization, "device_sms", lambda device: 8)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    from tests.models import tiny_llama

    path = tmp_path_factory.mktemp("triton") / "tiny"
    tiny_llama(seed=0).save_pretrained(path, safe_serialization=True)
    return path
