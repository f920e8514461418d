"""Array backends: numpy on the CPU; the one place that may import cupy."""

from __future__ import annotations

import sys

import numpy as np


def array_module(x):
    """The array module an array belongs to (numpy, cupy, ...) without importing cupy."""
    name = type(x).__module__.split(".")[0]
    return np if name == "numpy" else sys.modules[name]
