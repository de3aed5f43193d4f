"""Benchmarks of stepcache: the harness (``benchmarks.harness``) and the scripts that run it."""
