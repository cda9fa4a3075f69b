"""`coe logs stats --plot`: the routing mix over time, as a stacked area chart (PNG)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from coe.errors import CoeError
from coe.requestlog.record import RequestRecord

BINS = 30


class PlotUnavailableError(CoeError):
    def __init__(self) -> None:
        super().__init__(
            "--plot needs matplotlib, which is not installed in this environment: "
            "pip install matplotlib (it is one of coe's dependencies)"
        )


def plot_mix(records: Sequence[RequestRecord], out: Path, by: str = "category") -> None:
    """Requests per time bin, stacked by ``by`` (category or expert), written to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailableError() from None
    if not records:
        raise CoeError("no requests to plot: the log has none that match")
    start = min(r.time for r in records)
    end = max(r.time for r in records)
    width = max((end - start) / BINS, 1.0)
    bins = int((end - start) // width) + 1
    names = sorted({getattr(r, by) or "(none)" for r in records})
    counts = [Counter[str]() for _ in range(bins)]
    for r in records:
        counts[min(bins - 1, int((r.time - start) // width))][getattr(r, by) or "(none)"] += 1
    times = [datetime.fromtimestamp(start + (i + 0.5) * width) for i in range(bins)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.stackplot(times, [[c[n] for c in counts] for n in names], labels=names, step="mid")
    ax.set_title(f"Routing mix over time: {len(records)} requests by {by}")
    ax.set_ylabel(f"requests per {width:.0f} s")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
