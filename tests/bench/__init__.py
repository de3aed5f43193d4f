"""Tests of the benchmark harness (benchmarks/, not installed) and the peers."""
