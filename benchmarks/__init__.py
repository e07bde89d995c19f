"""openautoglm's benchmarks: one sub-package per capability, one shared harness (:mod:`benchmarks._harness`).

Run a benchmark as a module from the repository root, with the package importable (installed, or
``PYTHONPATH=src``)::

    PYTHONPATH=src python -m benchmarks.quant.speed --smoke

Each prints a short table and writes JSON (device, versions, git commit, date and every figure) through the
harness: to ``--out``, else ``$OUT/<capability>/``, else ``benchmarks/results/<capability>/`` (smoke runs: a
temporary folder).
``benchmarks/results/README.md`` lists what each kept result is and which module wrote it. The library never
imports this package; tests import nothing from it except to check that every module imports.
"""
