"""Tests of the shipped reference models and the metrics on them."""
