"""`make bench`: the op recipe (bench_<op>.py, pytest-benchmark) and one module per section
(bench.sections), run from the repository root as ``python -m bench.run``."""
