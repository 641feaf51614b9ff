"""Benchmarks of ippo (see README.md here)."""
