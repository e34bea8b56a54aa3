"""Microbenchmarks: fastdpo against what users would otherwise run.

``python -m fastdpo.bench`` runs a sweep on the default device and prints a
table of medians; see :mod:`fastdpo.bench.__main__`.
"""
