"""The main job's benchmark: ``python -m recap_kernels bench`` (see :mod:`recap_kernels.bench.run`).

``workloads`` defines the recap workload (model, batches, configs, from ``recap_config.yaml``),
``timing`` how a step is timed on each device, and ``run`` the contenders, the cross-backend check
and the report.
"""
