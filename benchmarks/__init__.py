"""Benchmarks: ratios against reference implementations, measured side by side (see README.md)."""
