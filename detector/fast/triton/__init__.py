"""Triton kernels only; their launchers and autograd functions live one level up in :mod:`detector.fast`."""
