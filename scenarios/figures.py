"""PNG figures beside a run's results (matplotlib, drawn off-screen)."""

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: Path, rows: int = 1, cols: int = 1, title: str | None = None, size: tuple = (6.4, 4.0)):
    """`with figure(path, 1, 2, title=...) as axes:` draw on `axes` (a flat list), saved to `path` at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    try:
        yield list(axes.flat)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
