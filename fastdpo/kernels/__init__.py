"""Kernel modules, one per backend; see :mod:`fastdpo._backends` for their contract."""
