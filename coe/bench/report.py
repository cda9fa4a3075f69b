"""What the benchmarks share for reporting: percentiles and rich tables."""

from __future__ import annotations


def percentile_ms(samples: list[float], q: float) -> float:
    """The q-th percentile of seconds, in milliseconds (nearest rank, no interpolation)."""
    ordered = sorted(samples)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
