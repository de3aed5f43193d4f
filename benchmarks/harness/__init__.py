"""Benchmarks against the peers a user would pick instead (``python benchmarks/bench.py``).

Not part of the installed library: it drives other libraries through their internals and needs
them installed (``pip install -r benchmarks/requirements.txt``).

* :mod:`.peers`: adapters that run dit-smoothcache, cache-dit and diffusers' caches on a DiT;
* :mod:`.quality`: suite A, the speed-quality frontier on the shipped reference model;
* :mod:`.speed`: suite B, wall time at DiT-B/2 and DiT-XL/2 shapes at matched compute fractions;
* :mod:`.report`: the versioned JSON report (``schema.json``), markdown tables and the frontier plot.
"""

from .report import BenchConfig, run_bench, validate

__all__ = ["BenchConfig", "run_bench", "validate"]
