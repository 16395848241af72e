"""Compiled kernels (built from csrc/). Import them through llm_fast.kernels."""
