"""Benchmark readers, one module per format (see ``base.py`` for the interface)."""
