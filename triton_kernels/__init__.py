"""Triton kernels of attnfast (imported as attnfast.triton_kernels)."""
