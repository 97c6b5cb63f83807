"""Benchmark harness: inputs, peers, timing, suites and reports."""
