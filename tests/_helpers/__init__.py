"""Helpers the tests import by package path: tiny plain-PyTorch models, pipeline and family cases,
model-state snapshots, the distributed workers."""
