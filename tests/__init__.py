"""The test suite, grouped by package: tests/runtime/ tests stepcache.runtime, and so on."""
