"""Benchmarks: speed and memory ratios measured side by side in one run (not timed tests)."""
