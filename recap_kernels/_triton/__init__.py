"""Triton kernels for the optimizer steps (the ``triton`` backend).

``_math`` holds the per-element update formulas, ``multi_tensor`` the device tables that let one
launch update every tensor of a bucket, and ``adam`` / ``adagrad`` the kernels and their launchers.
``embedding`` holds the embedding-table steps (Note [Table steps] in ``backends/_base.py``): exact
sparse Adagrad and row-wise Adagrad, one launch per table, without coalescing sparse gradients.
Importing this package imports Triton: only the backend module does so, lazily.
"""
