"""Benchmarks: scripts anyone can run (python -m llmaas.benchmarks.<name> --help)."""
