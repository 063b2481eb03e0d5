"""Benchmarks (not tests): ``python -m bench.http --help``."""
