"""`coe bench`: every benchmark. Each prints its figure beside a reference measured in the same
run; --json prints the figures instead. The measuring is in coe.bench; this module runs it and
draws the tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from coe.cli.runtime import (
    CliContext,
    check_expert,
    fail,
    load_router,
    needed_models,
    open_pool,
    pass_cli,
    status,
)

if TYPE_CHECKING:
    from coe.bench.cluster import ClusterBench
    from coe.bench.engine import EngineBench
    from coe.bench.host_copy import HostCopyBench
    from coe.bench.lora import LoraBench
    from coe.bench.pool import PoolBench
    from coe.bench.router import RouterBench
    from coe.bench.swap import SwapBench


@click.group()
def bench() -> None:
    """Benchmarks: each prints its figure beside a reference measured in the same run."""


@bench.command("engine")
@click.option("--expert", help="Expert whose engine to measure (default: the fallback's).")
@click.option("--tokens", default=128, show_default=True, help="New tokens per request.")
@click.option("--batch", default=16, show_default=True, help="Concurrent requests, batched.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_cli
def bench_engine(
    cli: CliContext, expert: str | None, tokens: int, batch: int, as_json: bool
) -> None:
    """Engine cold start and decode speed, beside plain transformers on the same model."""
    from coe.bench.engine import run_engine_bench
    from coe.models import ensure_models
    from coe.runtime import BackgroundLoop

    cfg = cli.config
    check_expert(cfg, expert)
    name = expert or cfg.fallback_expert
    ensure_models(needed_models(cfg, [name]))
    runner = BackgroundLoop()
    try:
        with status("measuring (engine start, decoding, then the transformers reference)"):
            result = runner.run(run_engine_bench(cfg, name, tokens, batch))
    finally:
        runner.close()
    _report(result, as_json, lambda: _print_engine(result, name, tokens, batch))


@bench.command("lora")
@click.option("--adapters", default=4, show_default=True, help="Test adapters in the stream.")
@click.option("--requests", default=16, show_default=True, help="Requests per stream.")
@click.option("--tokens", default=32, show_default=True, help="Tokens decoded per request.")
@click.option("--max-loras", type=int, help="Adapters per batch (default: all, and the base's).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_lora(
    adapters: int, requests: int, tokens: int, max_loras: int | None, as_json: bool
) -> None:
    """LoRA adapters on one engine beside the same experts merged into full checkpoints.

    A mixed stream over N adapters beside the base alone, the time to switch to an adapter from
    disk and from the host cache; then (LoRA engine shut down) the merged checkpoints swapped
    through the weight cache's one slot: full-weight swap time and the same mixed stream. Needs
    peft (the dev extra).
    """
    from coe.bench.lora import run_lora_bench
    from coe.runtime import BackgroundLoop

    runner = BackgroundLoop()
    try:
        with status("measuring (adapters, LoRA engine, then the merged checkpoints' pool)"):
            result = runner.run(run_lora_bench(adapters, requests, tokens, max_loras))
    finally:
        runner.close()
    _report(result, as_json, lambda: _print_lora(result))


@bench.command("swap")
@click.option("--repeats", default=7, show_default=True, help="HOST → HBM swaps to time.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_swap(repeats: int, as_json: bool) -> None:
    """Swap-in time of one expert by source tier, beside engine cold start and the copy floor.

    The expert is a seeded variant of the prepared gemma-3-270m (built once under COE_HOME).
    """
    from coe.bench.swap import run_swap_bench
    from coe.engines.vllm_local import VllmOptions
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
    _report(result, as_json, lambda: _print_swap(result, repeats))


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

    result = run_host_copy_bench(shape, repeats, workdir)
    _report(result, as_json, lambda: _print_host_copy(result, repeats))


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
    _report(result, as_json, lambda: _print_pool(result, n_experts, requests, tokens, rate))


@bench.command("prompts")
@click.option("--prompts", "count", default=40, show_default=True, help="Prompts to time.")
@click.option(
    "--generated", default=5, show_default=True, help="Prompts whose identity is written."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_cli
def bench_prompts(cli: CliContext, count: int, generated: int, as_json: bool) -> None:
    """Latency each prompt strategy adds (static and generated identities, mixture-of-prompts
    lookup), beside routing latency, in one run. Starts the writer expert's engine."""
    import tempfile

    from coe.bench.prompts import run_prompts_bench
    from coe.models import ensure_models
    from coe.runtime import BackgroundLoop

    cfg = cli.config
    if cfg.router.path is None:
        raise click.UsageError("the benchmark needs a router: set router.path in experts.yaml")
    router = load_router(cfg)
    fallback = cfg.fallback_expert
    ensure_models(needed_models(cfg, [fallback]), report=lambda m: None)
    runner = BackgroundLoop()
    try:
        with tempfile.TemporaryDirectory() as work:
            result = run_prompts_bench(cfg, router, runner, count, generated, Path(work))
    except ValueError as exc:  # the pool cannot run the benchmark (no writer, no categories)
        raise click.UsageError(str(exc)) from None
    finally:
        runner.close()
    _report(result, as_json, result.print_table)


@bench.command("gateway")
@click.option("--requests", default=200, show_default=True, help="Requests per measurement.")
@click.option("--tokens", default=1, show_default=True, help="New tokens per request.")
@click.option("--max-seconds", default=120.0, show_default=True, help="Stop measuring after.")
@click.option(
    "--redis-url",
    envvar="COE_REDIS_URL",
    help="Measure with this Redis as the store (env COE_REDIS_URL; default in-process).",
)
@click.option(
    "--ray",
    "on_ray",
    is_flag=True,
    help="Also through two gateway replicas on a local Ray Serve cluster (loopback), beside "
    "the single gateway; reports the Ray figures (needs the ray extra).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_cli
def bench_gateway(
    cli: CliContext,
    requests: int,
    tokens: int,
    max_seconds: float,
    redis_url: str | None,
    on_ray: bool,
    as_json: bool,
) -> None:
    """Gateway overhead: the same requests through the HTTP gateway and straight to the
    engine, interleaved in one run; and the latency of response-cache hits. Loopback only."""
    from coe.bench.gateway import run_gateway_bench

    cfg = cli.config
    expert = cfg.fallback_expert
    with open_pool(cfg, [expert], store_url=redis_url) as pool:
        result = run_gateway_bench(
            pool.orchestrator, pool.runner, expert, requests, tokens, max_seconds
        )
    if on_ray:
        from coe.bench.ray_gateway import run_ray_gateway_bench

        # The single gateway's engine is shut down by now: the Ray pool starts its own.
        ray_result = run_ray_gateway_bench(cfg, expert, result, requests, tokens)
        _report(ray_result, as_json, ray_result.print_table)
        return
    _report(result, as_json, result.print_table)


@bench.command("cli")
@click.option("--repeats", default=10, show_default=True, help="Asks against the running pool.")
@click.option(
    "--local-repeats",
    default=1,
    show_default=True,
    help="Asks with the pool started in-process (about a minute each on a CPU).",
)
@click.option("--max-tokens", default=16, show_default=True, help="New tokens per answer, at most.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_cli
def bench_cli(
    cli: CliContext, repeats: int, local_repeats: int, max_tokens: int, as_json: bool
) -> None:
    """`coe ask`'s wall time (a new process each time) against a running pool (`coe up`),
    beside `coe ask --local` (engines started in-process), in one run. Uses the pool running
    for this experts.yaml, else starts one and stops it after."""
    from coe.bench.cli import run_cli_bench

    _ = cli.config  # a broken experts.yaml fails here, not in every ask
    with status("measuring (coe up if needed, asks against the pool, then coe ask --local)"):
        result = run_cli_bench(cli.config_file, repeats, local_repeats, max_tokens)
    _report(result, as_json, result.print_table)


@bench.command("router")
@click.option(
    "--prompts",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Labelled prompts for the batched run (default: Arena-Hard v2.0 questions).",
)
@click.option("--repeats", default=100, show_default=True, help="Single-prompt repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@pass_cli
def bench_router(cli: CliContext, prompts: Path | None, repeats: int, as_json: bool) -> None:
    """Routing latency (p50/p99, short and long prompt) and batched throughput, beside plain
    sentence-transformers on PyTorch in the same run."""
    from coe.bench.router import run_router_bench
    from coe.paths import arena_hard_questions
    from coe.router.data import DataError, read_labelled

    path = prompts or arena_hard_questions()
    try:
        rows = read_labelled(path)
    except DataError as exc:
        fail(f"{exc} (set COE_EVALDATA or pass --prompts)")
    result = run_router_bench(load_router(cli.config), rows, repeats)
    _report(result, as_json, lambda: _print_router(result, path.name))


@bench.command("cluster")
@click.option("--nodes", default=8, show_default=True, help="Nodes in the full cluster.")
@click.option("--gpus-per-node", default=8, show_default=True, help="GPUs per node.")
@click.option("--experts", default=64, show_default=True, help="Experts in the pool.")
@click.option("--requests", default=4000, show_default=True, help="Requests in the trace.")
@click.option("--rate", default=10.0, show_default=True, help="Arrivals per second outside bursts.")
@click.option("--zipf", default=1.0, show_default=True, help="Zipf exponent of popularity.")
@click.option("--burst-x", default=3.0, show_default=True, help="Arrival rate in bursts, x.")
@click.option(
    "--burst-every-s", default=120.0, show_default=True, help="A burst every this many s."
)
@click.option("--burst-len-s", default=20.0, show_default=True, help="Each burst lasts (s).")
@click.option(
    "--median-tokens", default=256, show_default=True, help="Median output tokens (log-normal)."
)
@click.option("--batch", default=32, show_default=True, help="Requests one GPU runs at once.")
@click.option("--per-token-s", default=0.02, show_default=True, help="Decode seconds per token.")
@click.option(
    "--hbm-experts", default=1, show_default=True, help="Experts one GPU's HBM holds at once."
)
@click.option(
    "--host-experts", default=16, show_default=True, help="Checkpoints one node's RAM holds."
)
@click.option(
    "--swap-json", type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Move times from `coe bench swap --json` (or host-copy) output.",
)  # fmt: skip
@click.option("--swap-s", type=float, help="HOST → HBM seconds (default: H100, 16 GB, 0.294).")
@click.option("--disk-s", type=float, help="DISK → HOST seconds (default: H100, 16 GB, 15.1).")
@click.option("--cold-start-s", type=float, help="Engine start seconds (default: 60, assumed).")
@click.option(
    "--multiplex-load", type=click.Choice(["tiered", "cold"]), default="tiered",
    show_default=True,
    help="Serve's model load: coe's tiered moves, or an engine start per load.",
)  # fmt: skip
@click.option(
    "--slo-p99-s", default=5.0, show_default=True, help="SLO: p99 time to first token (s)."
)
@click.option(
    "--gpu-step", type=int, help="GPU counts the SLO search tries (default: whole nodes)."
)
@click.option("--max-gpus", type=int, help="Largest GPU count tried (default: 2x the cluster).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench_cluster(
    nodes: int,
    gpus_per_node: int,
    experts: int,
    requests: int,
    rate: float,
    zipf: float,
    burst_x: float,
    burst_every_s: float,
    burst_len_s: float,
    median_tokens: int,
    batch: int,
    per_token_s: float,
    hbm_experts: int,
    host_experts: int,
    swap_json: Path | None,
    swap_s: float | None,
    disk_s: float | None,
    cold_start_s: float | None,
    multiplex_load: str,
    slo_p99_s: float,
    gpu_step: int | None,
    max_gpus: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Residency-aware routing beside Serve's multiplexing and one engine per expert, on
    simulated nodes: a seeded trace through the real routing rule, scheduler and residency
    code; goodput, latency, swaps and the GPUs each needs for the SLO. Pure Python, seconds."""
    from coe.bench.cluster import (
        ARENA_HARD_LIKE,
        ClusterSpec,
        Moves,
        TraceSpec,
        moves_from_json,
        run_cluster_bench,
        with_moves,
    )

    if experts < len(ARENA_HARD_LIKE):
        raise click.BadParameter(
            f"at least one expert per category ({len(ARENA_HARD_LIKE)})", param_hint="--experts"
        )
    moves = moves_from_json(swap_json) if swap_json else Moves()
    moves = with_moves(
        moves,
        {"host_to_hbm_s": swap_s, "disk_to_host_s": disk_s, "cold_start_s": cold_start_s},
    )
    trace = TraceSpec(
        requests=requests,
        experts=experts,
        zipf=zipf,
        rate=rate,
        burst_x=burst_x,
        burst_every_s=burst_every_s,
        burst_len_s=burst_len_s,
        median_tokens=median_tokens,
        seed=seed,
    )
    spec = ClusterSpec(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        hbm_experts=hbm_experts,
        host_experts=host_experts,
        batch=batch,
        per_token_s=per_token_s,
        multiplex_load="cold" if multiplex_load == "cold" else "tiered",
    )
    result = run_cluster_bench(
        trace, spec, moves, slo_s=slo_p99_s, gpu_step=gpu_step, max_gpus=max_gpus
    )
    _report(result, as_json, lambda: _print_cluster(result))


# -- tables ----------------------------------------------------------------------------------


def _print_engine(result: EngineBench, name: str, tokens: int, batch: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine benchmark: {name} ({tokens} tokens/request)")
    for col in ("measure", "vLLM engine", "reference: transformers"):
        table.add_column(col)
    table.add_row("start / load (s)", f"{result.engine_start_s}", f"{result.reference_load_s}")
    table.add_row(
        "single-stream decode (tok/s)",
        f"{result.single_stream_tok_s}",
        f"{result.reference_single_stream_tok_s}",
    )
    table.add_row(f"batched decode, {batch} requests (tok/s)", f"{result.batched_tok_s}", "")
    table.add_row("time to first token (s)", f"{result.ttft_s}", "")
    Console().print(table)


def _print_lora(r: LoraBench) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.1f} ms"

    table = Table(
        title=f"LoRA benchmark: {r.adapters} adapters (rank {r.rank}) on {r.model}, "
        f"max_loras {r.max_loras}, {r.requests} requests x {r.tokens_per_request} tokens"
    )
    for col in ("measure", "LoRA adapters", "reference", "ratio"):
        table.add_column(col)
    table.add_row(
        "mixed stream (tok/s) vs base alone",
        f"{r.mixed_tok_s}",
        f"{r.base_tok_s}",
        f"{r.mixed_vs_base}x",
    )
    table.add_row(
        "mixed stream (tok/s) vs merged checkpoints swapped",
        f"{r.mixed_tok_s}",
        f"{r.merged_mixed_tok_s}",
        f"{r.lora_mixed_vs_merged_mixed}x",
    )
    table.add_row(
        "mixed stream (tok/s) vs a plain engine (no LoRA), one merged expert",
        f"{r.mixed_tok_s}",
        f"{r.merged_resident_tok_s}",
        f"{r.lora_mixed_vs_plain_engine}x",
    )
    ratio = r.full_swap_vs_adapter_switch
    table.add_row(
        "switch from host: adapter vs full-weight swap",
        ms(r.adapter_host_switch_s),
        f"{ms(r.full_swap_s)} (cache's own: {ms(r.full_swap_cache_s)})",
        "below noise" if ratio is None else f"{ratio}x cheaper",
    )
    table.add_row("adapter switch from disk (first use)", ms(r.adapter_switch_s), "", "")
    table.add_row(
        "time to first token", ms(r.adapter_warm_ttft_s), f"{ms(r.base_ttft_s)} (base)", ""
    )
    table.add_row(
        "engine start (s)", f"{r.engine_start_s}", f"{r.merged_pool_start_s} (merged pool)", ""
    )
    Console().print(table)
    for target, met in r.targets.items():
        Console().print(f"target {target}: {'met' if met else 'NOT met'}")


def _print_swap(r: SwapBench, repeats: int) -> None:
    from coe.bench.report import print_table

    floor = f"{r.floor_checkpoint_bytes_s:.4f} ({r.floor_kind}, {r.checkpoint_bytes:,} B)"
    print_table(
        f"swap benchmark ({r.device}): {r.checkpoint_bytes / 1e6:,.0f} MB checkpoint",
        ("measure", "seconds", "note"),
        [
            ("engine cold start", f"{r.engine_cold_start_s}", "what a swap costs without a cache"),
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
        f"answers after swaps match a fresh engine of the expert: {r.answers_match} "
        f"(base answers otherwise: {r.base_answer_differs})"
    )


def _print_host_copy(r: HostCopyBench, repeats: int) -> None:
    from coe.bench.report import print_table

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


def _print_pool(result: PoolBench, n_experts: int, requests: int, tokens: int, rate: float) -> None:
    from coe.bench.report import print_table

    rows = [
        (m.mode, f"{m.tokens_per_s}", f"{m.p50_latency_s}", f"{m.p95_latency_s}", f"{m.switches}")
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


def _print_router(result: RouterBench, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    r, ref = result.router, result.reference
    table = Table(title=f"router benchmark ({result.prompts} prompts from {source})")
    table.add_column("measure")
    table.add_column(f"router: {r.backend}, {r.max_seq_length} tokens", justify="right")
    table.add_column(
        f"reference: sentence-transformers, {ref.max_seq_length} tokens", justify="right"
    )
    table.add_column("speed-up", justify="right")
    table.add_row(
        f"short prompt ({result.short_prompt_chars} chars) p50 / p99 ms",
        f"{r.short_p50_ms} / {r.short_p99_ms}",
        f"{ref.short_p50_ms} / {ref.short_p99_ms}",
        f"{result.speedup['short_p50']}x",
    )
    table.add_row(
        f"long prompt ({result.long_prompt_chars} chars) p50 / p99 ms",
        f"{r.long_p50_ms} / {r.long_p99_ms}",
        f"{ref.long_p50_ms} / {ref.long_p99_ms}",
        f"{result.speedup['long_p50']}x",
    )
    table.add_row(
        f"batched (batch {result.batch_size}) prompts/s",
        f"{r.batched_prompts_per_s}",
        f"{ref.batched_prompts_per_s}",
        f"{result.speedup['batched']}x",
    )
    table.add_row(
        "accuracy on those prompts (same classifier)",
        f"{r.batched_accuracy}",
        f"{ref.batched_accuracy}",
        "",
    )
    Console().print(table)


def _print_cluster(result: ClusterBench) -> None:
    from coe.bench.report import print_table

    cluster, trace = result.inputs["cluster"], result.trace
    slo = result.inputs["slo_ttft_p99_s"]
    order = ("residency", "multiplex", "static")
    p = [result.policies[name] for name in order]

    def row(label: str, cell: Callable[[Any], object]) -> tuple[str, ...]:
        return (label, *(str(cell(f)) for f in p))

    def at_slo(f: Any) -> str:
        if f.gpus_for_slo is None:
            return f"none up to {result.inputs['max_gpus']}"
        there = f.at_slo_gpus
        return f"{f.gpus_for_slo} (p99 {there['ttft_p99_s']} s, {there['swaps']} swaps)"

    print_table(
        f"cluster simulation: {cluster['nodes']} nodes x {cluster['gpus_per_node']} GPUs, "
        f"{result.inputs['trace']['experts']} experts, {trace['requests']} requests over "
        f"{trace['duration_s']} s (seed {result.inputs['trace']['seed']}); "
        f"SLO: p99 time to first token <= {slo} s",
        ("measure", "residency-aware", "reference: Serve multiplexing", "reference: static"),
        [
            row("GPUs in this run", lambda f: f.gpus),
            row("goodput (req/s within SLO)", lambda f: f.goodput_rps),
            row("time to first token p50 / p99 (s)", lambda f: f"{f.ttft_p50_s} / {f.ttft_p99_s}"),
            row("latency p50 / p99 (s)", lambda f: f"{f.e2e_p50_s} / {f.e2e_p99_s}"),
            row("swaps into HBM", lambda f: f.swaps),
            row("disk loads / cold starts", lambda f: f"{f.disk_loads} / {f.cold_starts}"),
            row("fewest GPUs meeting the SLO", at_slo),
        ],
    )
    saving = result.gpu_saving_vs_static
    res, mux = p[0], p[1]
    click.echo(
        f"GPU saving vs static at the SLO: "
        f"{'n/a' if saving is None else f'{saving:.1%}'} (target >= 30%: "
        f"{result.targets['gpu_saving_ge_30pct']}); swaps residency-aware {res.swaps} vs "
        f"multiplexing {mux.swaps} (target fewer: {result.targets['fewer_swaps_than_multiplex']})"
    )


def _report(result: Any, as_json: bool, table: Callable[[], None]) -> None:
    """A benchmark's figures: as JSON with --json, else as its table."""
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        table()
