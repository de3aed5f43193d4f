"""Tests of stepcache.policies."""
