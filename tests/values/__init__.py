"""Tests of the values: schedules and their files, strict parsing, forecasts, fuzzed input."""
