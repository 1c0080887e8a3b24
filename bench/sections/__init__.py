"""The sections of `make bench` (bench/run.py, ``python -m bench.run``): each one measures a claim of the library
beside its baseline and returns a JSON-ready dict; shortcut_kernels.report turns the
directory of section JSON into report.md and the plots."""
