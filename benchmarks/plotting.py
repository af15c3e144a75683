"""matplotlib for the benchmark scripts' plots, or None (with a note) when it is not installed."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, or None when matplotlib is missing (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return None
    return plt
