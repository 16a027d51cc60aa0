"""Benchmark and fetch scripts: run with ``python -m bench.<name>``; they may import anything."""
