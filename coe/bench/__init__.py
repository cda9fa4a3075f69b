"""Benchmarks (`coe bench ...`): each prints its figure beside an in-run reference."""
