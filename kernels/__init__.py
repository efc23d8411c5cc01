"""Triton kernels behind quietstar's ops, shipped as ``quietstar.kernels``.

Kernel modules import ``triton`` and are loaded lazily by the ops that use them; nothing here
imports the model layer.
"""
