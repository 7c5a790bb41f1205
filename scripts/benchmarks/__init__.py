"""Benchmark scripts (run as modules from the bundle root); results and commands are in docs/."""
