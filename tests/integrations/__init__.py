"""Tests of stepcache.integrations: diffusers hooks, the Hub, real diffusers pipelines."""
