"""Triton kernels for the CUDA path (issue 16): paged attention, fused layer ops, multi-LoRA.

Importing a module here imports ``triton`` (a dependency of CUDA torch builds and of the test extras, not of
the CPU install): the engine imports them only when it builds a CUDA model, and the CPU path never does.
Each kernel has a torch reference in ``tests/unit/engine/kernels`` that it is checked against under Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors), and each is compiled for sm_90 there to check registers
and spills.
"""
