"""Adapters to other libraries. Each module imports its library lazily, on first use."""
