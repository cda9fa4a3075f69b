"""`coe bench swap` and `coe bench pool`: the weight cache's benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from coe.bench.report import print_table
from coe.engines.vllm_local import VllmOptions


def register(main: click.Group, bench: click.Group, pass_ctx: Any) -> None:
    """Attach the cache benchmarks to `coe bench`."""

    @bench.command("swap")
    @click.option("--repeats", default=7, show_default=True, help="HOST → HBM swaps to time.")
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    def bench_swap(repeats: int, as_json: bool) -> None:
        """Swap-in time of one expert by source tier, beside engine cold start and the copy floor.

        The expert is a seeded variant of the prepared gemma-3-270m (built once under COE_HOME).
        """
        from coe.bench.swap import run_swap_bench
        from coe.models import prepare_model
        from coe.models.variants import prepared_variant
        from coe.runtime import BackgroundLoop

        base = prepare_model("gemma-3-270m")
        variant = prepared_variant(1)
        runner = BackgroundLoop()
        try:
            options = VllmOptions(cpu_kv_cache_gib=1, max_num_seqs=8)
            result = runner.run(run_swap_bench(base, variant, options, repeats))
        finally:
            runner.close()
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        r = result
        floor = f"{r.floor_checkpoint_bytes_s:.4f} ({r.floor_kind}, {r.checkpoint_bytes:,} B)"
        print_table(
            f"swap benchmark ({r.device}): {r.checkpoint_bytes / 1e6:,.0f} MB checkpoint",
            ("measure", "seconds", "note"),
            [
                (
                    "engine cold start",
                    f"{r.engine_cold_start_s}",
                    "what a swap costs without a cache",
                ),
                (
                    "HOST → HBM (engine layout)",
                    f"{r.host_to_hbm_s}",
                    f"median of {repeats}; {r.effective_gb_s} GB/s",
                ),
                ("copy floor, same bytes", floor, f"swap / floor = {r.swap_vs_floor}"),
                (
                    "HOST → HBM (checkpoint layout)",
                    f"{r.host_to_hbm_checkpoint_layout_s}",
                    "first swap-in: vLLM reload_weights",
                ),
                ("DISK → HOST", f"{r.disk_to_host_s}", f"page cache {r.page_cache}"),
                ("DISK → HBM", f"{r.disk_to_hbm_s}", "vLLM reload from the folder"),
            ],
        )
        click.echo(
            f"cold start / swap: {r.cold_start_vs_swap}x; bytes copied per swap "
            f"{r.copied_bytes:,} (+{r.rebound_linears} packed linears rebound); "
            f"answers after swaps match: {r.answers_match}"
        )

    @bench.command("host-copy")
    @click.option(
        "--shape", type=click.Choice(["270m", "8b", "tiny"]), default="270m", show_default=True,
        help="Parameter shapes: gemma-3-270m, Llama-3-8B, or tiny (tests).",
    )  # fmt: skip
    @click.option("--repeats", default=7, show_default=True, help="HOST → HBM swaps to time.")
    @click.option(
        "--dir", "workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
        help="Where to write the two random checkpoints (default: the system's temp folder).",
    )  # fmt: skip
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    def bench_host_copy(shape: str, repeats: int, workdir: Path | None, as_json: bool) -> None:
        """The weight cache's HOST → HBM copy on this machine's GPU (CPU without one), beside the
        pinned-copy floor of the same bytes and a load from disk; needs torch, not vLLM.
        """
        from coe.bench.host_copy import run_host_copy_bench

        r = run_host_copy_bench(shape, repeats, workdir)
        if as_json:
            click.echo(json.dumps(r.as_dict(), indent=2))
            return
        print_table(
            f"host-copy benchmark ({r.device_name}): {r.shape}, "
            f"{r.checkpoint_bytes / 1e9:.2f} GB in {r.tensors} tensors",
            ("measure", "seconds", "note"),
            [
                (
                    "HOST → HBM (engine layout)",
                    f"{r.host_to_device_s}",
                    f"median of {repeats}; {r.effective_gb_s} GB/s",
                ),
                (
                    "copy floor, same bytes",
                    f"{r.floor_s}",
                    f"{r.floor_kind}, {r.floor_gb_s} GB/s; swap / floor = {r.swap_vs_floor}",
                ),
                ("DISK → HBM", f"{r.disk_to_device_s}", "safetensors straight to the device"),
                ("DISK → HOST", f"{r.disk_to_host_s}", f"pinned; page cache {r.page_cache}"),
                ("HBM → HOST", f"{r.capture_s}", "capture, once per expert"),
            ],
        )
        click.echo(
            f"disk load / swap: {r.disk_to_device_vs_swap}x; "
            f"weights after swaps match: {r.weights_match}"
        )

    @bench.command("pool")
    @click.option(
        "--experts", "n_experts", default=4, show_default=True, help="Experts sharing one slot."
    )
    @click.option("--requests", default=128, show_default=True, help="Requests in the stream.")
    @click.option("--tokens", default=32, show_default=True, help="Tokens decoded per request.")
    @click.option("--rate", default=16.0, show_default=True, help="Arrivals per second (Poisson).")
    @click.option("--max-wait", default=2.0, show_default=True, help="Scheduler bound (s).")
    @click.option("--seed", default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    def bench_pool(
        n_experts: int,
        requests: int,
        tokens: int,
        rate: float,
        max_wait: float,
        seed: int,
        as_json: bool,
    ) -> None:
        """Throughput of a mixed stream over experts sharing one slot: coe's scheduler beside an
        always-resident single expert (upper bound) and a naive swap-on-every-change baseline."""
        from coe.bench.pool import run_pool_bench
        from coe.models import prepare_model
        from coe.models.variants import prepared_variant
        from coe.runtime import BackgroundLoop

        if n_experts < 2:
            raise click.BadParameter("at least 2 experts share the slot", param_hint="--experts")
        checkpoints = [prepare_model("gemma-3-270m")]
        checkpoints += [prepared_variant(seed_) for seed_ in range(1, n_experts)]
        runner = BackgroundLoop()
        try:
            result = runner.run(
                run_pool_bench(
                    checkpoints,
                    requests=requests,
                    tokens=tokens,
                    rate=rate,
                    max_wait_s=max_wait,
                    seed=seed,
                )
            )
        finally:
            runner.close()
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        rows = [
            (
                m.mode,
                f"{m.tokens_per_s}",
                f"{m.p50_latency_s}",
                f"{m.p95_latency_s}",
                f"{m.switches}",
            )
            for m in result.modes.values()
        ]
        print_table(
            f"pool benchmark: {n_experts} experts, 1 slot, {requests} requests x {tokens} tokens, "
            f"{rate}/s",
            ("mode", "tokens/s", "p50 latency (s)", "p95 latency (s)", "switches"),
            rows,
        )
        click.echo(
            f"scheduler / resident = {result.vs_resident:.2f} (target >= 0.8); "
            f"scheduler / naive = {result.vs_naive:.2f} (target >= 3)"
        )
