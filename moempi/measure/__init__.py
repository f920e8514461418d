"""Measuring tools: benchmarks (`make bench`), the calibration and the validation of
the performance model against timed runs."""
