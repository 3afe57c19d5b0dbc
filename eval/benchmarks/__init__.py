"""The benchmarks of eval/bench.py, one module per benchmark (``conversion``, ``kv_cache``, ``calibration``,
``distill``, ``recovery``, ``runtime``), each with its ``bench_*`` function, its targets and the ``_job_*`` child
jobs it launches (registered in the module's ``JOBS``); ``common`` holds the table rows and the bounded child
processes, ``synthetic`` the synthetic 2B-4T checkpoint.

Every module imports only the standard library at the top (heavy imports happen inside the jobs), so the process
that orchestrates the benchmarks stays light and its children inherit no high-water mark from it.
"""
