"""Tests of stepcache.runtime: the cache, step tracking, reliability, compile, every DiT family."""
