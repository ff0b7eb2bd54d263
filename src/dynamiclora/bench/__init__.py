"""Benchmarks that ship with the package (``dynamiclora bench NAME``); ``benchmarks/`` holds the scripts."""
