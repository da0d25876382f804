"""Triton kernels for the dense optimizer steps (the ``triton`` backend).

``_math`` holds the per-element update formulas, ``multi_tensor`` the device tables that let one
launch update every tensor of a bucket, and ``adam`` / ``adagrad`` the kernels and their launchers.
Importing this package imports Triton: only the backend module does so, lazily.
"""
