"""`coe bench cluster`: the residency-aware routing rule at cluster scale, in simulation.

A seeded trace is replayed, in virtual time, over simulated nodes of GPUs (default 8 x 8) for
three ways of serving 64 experts, each measured in the same run:

- ``residency``: coe on a cluster. Each request goes to the replica that
  ``coe.cluster.policy.rank_replicas`` ranks first (the Serve request router's rule); each GPU
  runs coe's ``Scheduler`` (per-expert queues, switching when a queue drains or another expert
  is overdue, never with requests in flight); each node keeps a host-RAM tier whose evictions
  ``ResidencyManager.host_victims`` chooses, and whose move costs ``switch_seconds`` gives.
  A routed request starts its expert's disk read on that node at once (prefetch), as the
  weight cache does.
- ``multiplex``: Ray Serve 2.60's model multiplexing, modelled on its code: the router
  (``MultiplexMixin.apply_multiplex_routing`` with ``PowerOfTwoChoicesRequestRouter``) prefers
  replicas that report the model (loaded or loading), falls back to the replicas with the fewest
  models (after one try, or at once if none has it), then to every replica after a 1-2 s
  matching timeout; of two random candidates it takes the shorter queue among those under
  ``max_ongoing_requests`` (the batch), else backs off (0.025 s doubling to 0.5 s) and tries
  again. A replica (``_ModelMultiplexWrapper.load_model``) loads a missing model under one lock,
  first unloading its least recently used one when it holds ``max_num_models_per_replica``
  (the HBM room). Serve unloads it even with requests running on it; here the load then waits
  for them to finish, since the GPU has room for that many models only (in Serve they would
  fail, or the load would run out of memory). Loads move weights the way coe's cache does (the
  same node host tiers and move times), so the comparison isolates routing and scheduling;
  ``multiplex_load="cold"`` makes each load an engine start instead (Serve with one vLLM
  engine per model load).
- ``static``: one engine per expert, always resident, never swapping; with more GPUs than
  experts the extra engines go to the experts with the most requests in the trace (a planner
  that knows the trace: the most favourable static plan), least-loaded replica first.

Real code: ``policy.rank_replicas``, ``Scheduler`` (driven unchanged on an asyncio loop whose
clock jumps to the next timer), ``ResidencyManager`` (host-tier victims and move costs; its
``Bandwidths`` are set from the move times), ``Tier``. Modelled: everything an engine does.
A request holds one of its GPU's batch places for ``prefill_s + tokens * per_token_s`` (decode
speed does not depend on the batch size up to ``batch``); a move takes its measured time
(HOST -> HBM ``host_to_hbm_s``; DISK -> HOST ``disk_to_host_s``, reads in parallel; every
HOST -> HBM copy at the engine-layout speed); the node's host tier holds ``host_experts``
checkpoints and is shared by its GPUs. Requests never fail or time out. Serve's router is
modelled with exact queue lengths and without its FIFO hand-off between routing tasks.

Move-time defaults are GPU measurements of this project for a Llama-3-8B-shaped 16 GB expert
on an H100 (README, ``coe bench host-copy --shape 8b``): HOST -> HBM 0.294 s, DISK -> HOST into
registered host memory 15.1 s (coe/cache/checkpoint_read.py). The engine cold start (60 s) is
an assumption, not a measurement: vLLM's start of an 8B model with CUDA graphs takes tens of
seconds. ``--swap-json`` replaces them with a ``coe bench swap --json`` (or ``coe bench
host-copy --json``) run. Decode speed (20 ms per token per request at a batch of up to 32) is
an assumption for an 8B model on such a GPU.

The trace: Poisson arrivals at ``rate``, ``burst_x`` times that for ``burst_len_s`` of every
``burst_every_s``; output lengths log-normal (median ``median_tokens``); each request's category
drawn from a fixed, coding-heavy mix (chosen by hand after Arena-Hard v2.0's published make-up:
two thirds hard prompts, mostly software and technical, one third creative writing; no eval
data is read): coding 0.40, writing 0.22, math 0.10, reasoning 0.10, stem 0.07, roleplay 0.05,
extraction 0.03, humanities 0.03. The experts are split among the categories in proportion to
the mix (at least one each), and a category's requests go to its experts by Zipf popularity
(weight 1 / rank ** zipf).

Latency is time to first token (queueing, any weight move, prefill); the SLO is on its p99
(nearest rank). "GPUs for the SLO" is the smallest GPU count, in steps of ``gpu_step``, whose
run meets it, by binary search (it assumes more GPUs never raise the p99); a run stops as soon
as enough requests missed the SLO to decide it fails. Every figure is deterministic per seed.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import selectors
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from coe.bench.report import percentile_ms
from coe.cache.residency import Bandwidths, ResidencyManager
from coe.cache.scheduler import Scheduler
from coe.cache.tiers import ExpertResidency, Tier
from coe.cluster import policy as routing  # called as routing.rank_replicas: tests replace it

PolicyName = Literal["residency", "multiplex", "static"]
POLICIES: tuple[PolicyName, ...] = ("residency", "multiplex", "static")
MultiplexLoad = Literal["tiered", "cold"]

# Category -> share of requests (see the module docstring for where it comes from).
ARENA_HARD_LIKE: dict[str, float] = {
    "coding": 0.40,
    "writing": 0.22,
    "math": 0.10,
    "reasoning": 0.10,
    "stem": 0.07,
    "roleplay": 0.05,
    "extraction": 0.03,
    "humanities": 0.03,
}

# Ray Serve 2.60's constants (ray/serve/_private/constants.py).
SERVE_MATCHING_TIMEOUT_S = 1.0  # RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S
SERVE_INITIAL_BACKOFF_S = 0.025
SERVE_BACKOFF_MULTIPLIER = 2
SERVE_MAX_BACKOFF_S = 0.5
# coe's decayed request rate (ResidencyManager's default half-life).
HALF_LIFE_S = 120.0


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moves:
    """Seconds each weight move takes, for one expert of ``expert_bytes``."""

    host_to_hbm_s: float = 0.294
    disk_to_host_s: float = 15.1
    cold_start_s: float = 60.0
    expert_bytes: int = 16_000_000_000
    source: str = "H100, 16 GB expert (coe bench host-copy --shape 8b); cold start assumed"


def moves_from_json(path: Path, base: Moves | None = None) -> Moves:
    """Move times from `coe bench swap --json` (or `coe bench host-copy --json`) output; a
    figure the file lacks keeps its value in ``base``."""
    data = json.loads(path.read_text())
    base = base or Moves()
    swap = data.get("host_to_hbm_s", data.get("host_to_device_s", base.host_to_hbm_s))
    return Moves(
        host_to_hbm_s=float(swap),
        disk_to_host_s=float(data.get("disk_to_host_s", base.disk_to_host_s)),
        cold_start_s=float(data.get("engine_cold_start_s", base.cold_start_s)),
        expert_bytes=int(data.get("checkpoint_bytes", base.expert_bytes)),
        source=f"{path.name} ({data.get('device', 'device not named')})",
    )


@dataclass(frozen=True)
class TraceSpec:
    requests: int = 4000
    experts: int = 64
    zipf: float = 1.0
    rate: float = 10.0  # arrivals per second outside bursts
    burst_x: float = 3.0
    burst_every_s: float = 120.0
    burst_len_s: float = 20.0
    median_tokens: int = 256
    tokens_sigma: float = 0.8
    max_tokens: int = 2048  # the requests' max_tokens: the scheduler's measure of work
    mix: tuple[tuple[str, float], ...] = tuple(ARENA_HARD_LIKE.items())
    seed: int = 0


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 8
    gpus_per_node: int = 8
    hbm_experts: int = 1  # experts one GPU holds at once (slots; Serve: models per replica)
    host_experts: int = 16  # checkpoints one node's host RAM holds
    batch: int = 32  # requests one GPU runs at once (Serve: max_ongoing_requests)
    per_token_s: float = 0.02
    prefill_s: float = 0.1
    max_wait_s: float = 2.0  # the scheduler's bound before a slot drains for another expert
    multiplex_load: MultiplexLoad = "tiered"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


# --- the trace --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    index: int
    arrival: float
    expert: str
    category: str
    tokens: int


@dataclass(frozen=True)
class Trace:
    spec: TraceSpec
    requests: list[Request]
    groups: dict[str, list[str]]  # category -> its experts, most popular first
    popularity: dict[str, float]  # expert -> expected share of requests

    @property
    def experts(self) -> list[str]:
        """Every expert, most popular first (ties in category order)."""
        return sorted(self.popularity, key=lambda e: -self.popularity[e])

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Popularity of ranks 1..n, normalised: rank ** -exponent."""
    raw = [1.0 / (rank**exponent) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def expert_groups(mix: Sequence[tuple[str, float]], experts: int) -> dict[str, list[str]]:
    """Experts per category in proportion to its share (largest remainder, at least one)."""
    if experts < len(mix):
        raise ValueError(f"{experts} experts cannot cover {len(mix)} categories")
    total = sum(share for _, share in mix)
    exact = [experts * share / total for _, share in mix]
    counts = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: -(exact[i] - math.floor(exact[i])))
    i = 0
    while sum(counts) < experts:
        counts[by_remainder[i % len(mix)]] += 1
        i += 1
    while sum(counts) > experts:  # the minimum of one pushed the total over
        largest = max(range(len(mix)), key=lambda j: counts[j])
        counts[largest] -= 1
    return {cat: [f"{cat}-{k}" for k in range(n)] for (cat, _), n in zip(mix, counts, strict=True)}


def _arrivals(rng: random.Random, spec: TraceSpec) -> list[float]:
    """Poisson arrivals whose rate is ``burst_x`` higher in the last ``burst_len_s`` of every
    ``burst_every_s`` (thinning a process at the peak rate)."""
    peak = spec.rate * max(1.0, spec.burst_x)
    times: list[float] = []
    t = 0.0
    while len(times) < spec.requests:
        t += rng.expovariate(peak)
        in_burst = spec.burst_len_s > 0 and (
            t % spec.burst_every_s >= spec.burst_every_s - spec.burst_len_s
        )
        rate = spec.rate * spec.burst_x if in_burst else spec.rate
        if rng.random() < rate / peak:
            times.append(t)
    return times


def make_trace(spec: TraceSpec) -> Trace:
    rng = random.Random(spec.seed)
    groups = expert_groups(spec.mix, spec.experts)
    total = sum(share for _, share in spec.mix)
    categories = [cat for cat, _ in spec.mix]
    shares = [share / total for _, share in spec.mix]
    within = {cat: zipf_weights(len(members), spec.zipf) for cat, members in groups.items()}
    popularity = {
        expert: share * w
        for cat, share in zip(categories, shares, strict=True)
        for expert, w in zip(groups[cat], within[cat], strict=True)
    }
    requests = []
    for index, arrival in enumerate(_arrivals(rng, spec)):
        category = rng.choices(categories, shares)[0]
        expert = rng.choices(groups[category], within[category])[0]
        tokens = round(spec.median_tokens * math.exp(spec.tokens_sigma * rng.gauss(0.0, 1.0)))
        tokens = min(spec.max_tokens, max(1, tokens))
        requests.append(Request(index, arrival, expert, category, tokens))
    return Trace(spec, requests, groups, popularity)


# --- virtual time -----------------------------------------------------------------------------


class _VirtualSelector(selectors.SelectSelector):
    """Nothing is ever ready to read: waiting for I/O with a timeout is jumping the clock to the
    next timer."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("the simulation stalled: nothing left to wait for")
        self.now += max(0.0, timeout)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: the real scheduler's timers and awaits run
    unchanged, and a day of traffic takes as long as its events take to process."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


# --- the simulated cluster --------------------------------------------------------------------


class _Slot:
    """coe's slot as the scheduler sees it (``SlotLike``): one engine holding one expert."""

    def __init__(self, index: int, capacity: int, resident: str | None):
        self.index = index
        self.capacity = capacity
        self.in_flight = 0
        self._resident = resident

    @property
    def resident(self) -> str | None:
        return self._resident

    def set_resident(self, expert: str | None) -> None:
        self._resident = expert


@dataclass(eq=False)
class _Node:
    index: int
    residency: ResidencyManager
    gpus: list[_Gpu] = field(default_factory=list)
    reads: dict[str, asyncio.Task[bool]] = field(default_factory=dict)  # DISK -> HOST under way


@dataclass(eq=False)
class _Gpu:
    name: str
    node: _Node
    slots: list[_Slot]
    load: int = 0  # requests routed here and not finished (the router's queue length)
    scheduler: Scheduler | None = None  # residency, static
    incoming: set[str] = field(default_factory=set)  # experts a slot is switching to
    # Serve multiplexing: the replica's model cache (LRU order) and the loads it waits on.
    models: OrderedDict[str, None] = field(default_factory=OrderedDict)
    loading: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    running: dict[str, int] = field(default_factory=dict)  # requests running, per model
    drain_waiters: dict[str, list[asyncio.Future[None]]] = field(default_factory=dict)

    def holds(self, expert: str) -> bool:
        return any(s.resident == expert for s in self.slots)

    def serve_model_ids(self) -> set[str]:
        """What a multiplexed Serve replica reports: loaded and loading models."""
        return set(self.models) | self.loading


class _Switcher:
    """The scheduler's ``Switcher`` for one GPU: moves along the cache's cheapest path."""

    def __init__(self, sim: _Sim, gpu: _Gpu):
        self.sim = sim
        self.gpu = gpu

    def switch_seconds(self, expert: str) -> float:
        if self.gpu.holds(expert):
            return 0.0
        return self.gpu.node.residency.switch_seconds(expert)

    def can_serve(self, expert: str, slot: int) -> bool:
        return self.sim.policy != "static"  # a static engine never changes its expert

    async def make_resident(self, slot: _Slot, expert: str) -> None:
        self.gpu.incoming.add(expert)
        try:
            await self.sim.move_in(self.gpu, expert)
            slot.set_resident(expert)
        finally:
            self.gpu.incoming.discard(expert)


@dataclass
class _ServeRouting:
    """One request's routing context in Serve's router (``RequestRoutingContext``)."""

    start: float
    tried_first: bool = False
    tried_fewest: bool = False


@dataclass
class SimRun:
    """One policy's run on one cluster size. ``decided_fail``: the run stopped early because
    enough requests missed the SLO that its p99 cannot meet it."""

    policy: str
    gpus: int
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    swaps: int = 0
    disk_loads: int = 0
    cold_starts: int = 0
    swap_times: list[float] = field(default_factory=list)
    decided_fail: bool = False

    def ttft_p(self, q: float) -> float:
        return percentile_ms(self.ttft_s, q) / 1000 if self.ttft_s else math.inf

    def e2e_p(self, q: float) -> float:
        return percentile_ms(self.e2e_s, q) / 1000 if self.e2e_s else math.inf

    def meets(self, slo_s: float) -> bool:
        return not self.decided_fail and self.ttft_p(0.99) <= slo_s


def misses_allowed(requests: int, q: float = 0.99) -> int:
    """Requests that may miss the SLO with the q-th percentile (nearest rank) still within it."""
    return requests - int(q * requests) - 1


class _Sim:
    def __init__(
        self,
        policy: PolicyName,
        trace: Trace,
        spec: ClusterSpec,
        moves: Moves,
        gpus: int,
        *,
        slo_s: float | None = None,
        loop: _VirtualLoop,
    ):
        self.policy = policy
        self.trace = trace
        self.spec = spec
        self.moves = moves
        self.loop = loop
        self.run = SimRun(policy, gpus)
        self.slo_s = slo_s  # set: stop once the SLO is decided missed
        self.misses = 0
        self.miss_limit = misses_allowed(len(trace.requests))
        self.rng = random.Random(f"serve-router-{trace.spec.seed}")
        self.fallback_match: set[str] = set()  # Serve's _multiplexed_model_id_fallback_match
        self.nodes: list[_Node] = []
        self.gpus: list[_Gpu] = []
        self.replicas_of: dict[str, list[_Gpu]] = {}  # static
        self.by_name: dict[str, _Gpu] = {}
        self.outcome: asyncio.Future[None] = loop.create_future()
        self.pending = len(trace.requests)
        self._build(gpus)

    # --- the cluster at t = 0
    def _build(self, gpus: int) -> None:
        per_node = self.spec.gpus_per_node
        for n in range(math.ceil(gpus / per_node)):
            self.nodes.append(_Node(n, self._residency()))
        residents = self._initial_residents(gpus)
        k = len(residents[0]) if residents else 0
        capacity = max(1, self.spec.batch // max(1, k))
        for j in range(gpus):
            node = self.nodes[j // per_node]
            slots = [_Slot(i, capacity, e) for i, e in enumerate(residents[j])]
            gpu = _Gpu(f"n{node.index}g{j % per_node}", node, slots)
            if self.policy == "multiplex":
                gpu.models.update((e, None) for e in residents[j])
            else:
                gpu.scheduler = Scheduler(
                    slots, _Switcher(self, gpu), max_wait_s=self.spec.max_wait_s,
                    clock=self.loop.time,
                )  # fmt: skip
            node.gpus.append(gpu)
            self.gpus.append(gpu)
            self.by_name[gpu.name] = gpu
            for e in residents[j]:
                self.replicas_of.setdefault(e, []).append(gpu)
        for node in self.nodes:
            self._warm_host_tier(node)

    def _residency(self) -> ResidencyManager:
        size = self.moves.expert_bytes
        records = [ExpertResidency(e, path="", disk_bytes=size) for e in self.trace.popularity]
        manager = ResidencyManager(
            records, self.spec.host_experts * size, HALF_LIFE_S, clock=self.loop.time
        )
        # convert = the HOST -> HBM speed, so a reload from disk costs a read plus a copy.
        manager.bandwidth = Bandwidths(
            disk_to_host=size / self.moves.disk_to_host_s,
            host_to_hbm=size / self.moves.host_to_hbm_s,
            convert=size / self.moves.host_to_hbm_s,
        )
        return manager

    def _initial_residents(self, gpus: int) -> list[list[str]]:
        """Experts each GPU holds at the start. Swapping policies: the most popular experts
        dealt over the GPUs' slots in turn (the deployment has been serving a while); static:
        one engine per expert, extra engines to the experts with the most requests."""
        experts = self.trace.experts
        if self.policy != "static":
            k = self.spec.hbm_experts
            return [[experts[(j * k + i) % len(experts)] for i in range(k)] for j in range(gpus)]
        if gpus < len(experts):
            raise ValueError(f"static needs one GPU per expert: {gpus} < {len(experts)}")
        counts = {e: 0 for e in experts}
        for r in self.trace.requests:
            counts[r.expert] += 1
        engines = dict.fromkeys(experts, 1)
        for _ in range(gpus - len(experts)):
            busiest = max(experts, key=lambda e: counts[e] / engines[e])
            engines[busiest] += 1
        order = [e for e in experts for _ in range(engines[e])]
        return [[e] for e in order]

    def _warm_host_tier(self, node: _Node) -> None:
        """Host RAM at the start: the node's resident experts, then others dealt over the nodes
        (node n takes experts n, n + nodes, ... first), as room allows."""
        if self.policy == "static":
            return
        nodes = len(self.nodes)
        experts = self.trace.experts
        mine = [s.resident for g in node.gpus for s in g.slots if s.resident is not None]
        dealt = [e for i, e in enumerate(experts) if i % nodes == node.index]
        for e in [*mine, *dealt, *experts]:
            if not self._has_room(node):
                break
            if node.residency[e].host_slot is None:
                node.residency.claim_host(e, 0, "engine", self.moves.expert_bytes)

    def _has_room(self, node: _Node) -> bool:
        manager = node.residency
        return manager.host_used() + self.moves.expert_bytes <= manager.host_budget

    # --- running
    async def main(self) -> None:
        driver = self.loop.create_task(self._drive())
        try:
            await self.outcome
        finally:
            driver.cancel()

    async def _drive(self) -> None:
        for request in self.trace.requests:
            delay = request.arrival - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.loop.create_task(self._request(request))

    async def _request(self, request: Request) -> None:
        try:
            start = await self._serve(request)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug in the simulation: fail the run loudly
            if not self.outcome.done():
                self.outcome.set_exception(exc)
            return
        self._record(request, start)

    async def _serve(self, request: Request) -> float:
        """Route, queue, run; returns the time the request's prefill started."""
        if self.policy == "multiplex":
            gpu = await self._route_serve(request.expert)
            gpu.node.residency.note_request(request.expert)
        elif self.policy == "residency":
            gpu = self._route_residency(request.expert)
        else:
            gpu = min(self.replicas_of[request.expert], key=lambda g: g.load)
        gpu.load += 1
        try:
            if self.policy == "multiplex":
                return await self._run_multiplexed(gpu, request)
            return await self._run_scheduled(gpu, request)
        finally:
            gpu.load -= 1

    def _service_s(self, request: Request) -> float:
        return self.spec.prefill_s + request.tokens * self.spec.per_token_s

    def _record(self, request: Request, start: float) -> None:
        ttft = start + self.spec.prefill_s - request.arrival
        self.run.ttft_s.append(ttft)
        self.run.e2e_s.append(start + self._service_s(request) - request.arrival)
        if self.slo_s is not None and ttft > self.slo_s:
            self.misses += 1
            if self.misses > self.miss_limit and not self.outcome.done():
                self.run.decided_fail = True
                self.outcome.set_result(None)
        self.pending -= 1
        if self.pending == 0 and not self.outcome.done():
            self.outcome.set_result(None)

    # --- residency-aware routing and coe's per-GPU scheduler
    def _route_residency(self, expert: str) -> _Gpu:
        """The Serve router's rule: the first replica of the first rank."""
        loads = [
            routing.ReplicaLoad(
                gpu.name, {expert: self._tier(gpu, expert)}, gpu.load, self.spec.batch
            )
            for gpu in self.gpus
        ]
        ranks = routing.rank_replicas(expert, loads)
        gpu = self.by_name[ranks[0][0]]
        gpu.node.residency.note_request(expert)  # as the cache does on a request, then prefetch
        self._prefetch(gpu.node, expert)
        return gpu

    def _tier(self, gpu: _Gpu, expert: str) -> Tier:
        """What a replica reports of an expert: HBM if a slot holds it or is switching to it,
        else where its node's copy is. (Only the requested expert's tier: all the rule reads.)"""
        if expert in gpu.incoming or gpu.holds(expert):
            return Tier.HBM
        return gpu.node.residency[expert].tier

    async def _run_scheduled(self, gpu: _Gpu, request: Request) -> float:
        scheduler = gpu.scheduler
        assert scheduler is not None
        slot = await scheduler.acquire(request.expert, work=self.trace.spec.max_tokens)
        try:
            start = self.loop.time()
            await asyncio.sleep(self._service_s(request))
            return start
        finally:
            scheduler.release(slot)

    # --- weight moves (residency, and multiplex loads in "tiered" mode)
    def _prefetch(self, node: _Node, expert: str) -> None:
        """The router named the expert: start reading it into the node's host RAM if it is only
        on disk and room can be made without evicting anything worth more (HostTier.prefetch)."""
        record = node.residency[expert]
        if record.host_slot is not None or expert in node.reads:
            return
        if any(g.holds(expert) for g in node.gpus):
            return
        self._start_read(node, expert, below=node.residency.expected_cost(expert))

    def _busy(self, node: _Node) -> set[str]:
        """Experts whose host copy must stay: held or being moved into HBM on the node, or with
        requests queued there (the weight cache's busy units)."""
        busy: set[str] = set()
        for gpu in node.gpus:
            busy |= {s.resident for s in gpu.slots if s.resident is not None}
            busy |= gpu.incoming | gpu.serve_model_ids()
            if gpu.scheduler is not None:
                busy |= gpu.scheduler.busy()
        return busy

    def _start_read(self, node: _Node, expert: str, below: float | None) -> bool:
        """Claim host room for a DISK -> HOST read and start it; False if no room."""
        manager = node.residency
        need = manager.host_estimate(expert, "checkpoint")
        victims = manager.host_victims(need, protect={expert} | self._busy(node), below=below)
        if victims is None:
            return False
        for victim in victims:
            manager.forget_host(victim)
        manager.claim_host(expert, 0, "checkpoint", need)
        task = self.loop.create_task(self._read(node, expert, need))
        node.reads[expert] = task
        task.add_done_callback(lambda _: node.reads.pop(expert, None))
        return True

    async def _read(self, node: _Node, expert: str, nbytes: int) -> bool:
        self.run.disk_loads += 1
        await asyncio.sleep(self.moves.disk_to_host_s)
        node.residency.staged(expert, nbytes)
        return True

    async def move_in(self, gpu: _Gpu, expert: str) -> None:
        """Bring an expert's weights into this GPU's HBM: wait for a read under way, else read
        it into host RAM (evicting what is worth least), then copy; with no host room, the
        read goes straight to the engine (ResidencyManager.switch_seconds prices both)."""
        node = gpu.node
        if expert in node.reads:
            await asyncio.shield(node.reads[expert])
        if node.residency[expert].host_slot is None and self._start_read(node, expert, None):
            await asyncio.shield(node.reads[expert])
        seconds = node.residency.switch_seconds(expert)  # HOST: a copy; DISK: read and copy
        if node.residency[expert].tier is Tier.DISK:
            self.run.disk_loads += 1
        await asyncio.sleep(seconds)
        self.run.swaps += 1
        self.run.swap_times.append(self.loop.time())

    # --- Ray Serve's multiplexing
    async def _route_serve(self, expert: str) -> _Gpu:
        """PowerOfTwoChoicesRequestRouter with MultiplexMixin: candidates, two random ones, the
        shorter queue among those that accept; else back off and try again."""
        context = _ServeRouting(self.loop.time())
        attempt = 0
        backed_off = False
        while True:
            candidates = self._serve_candidates(expert, context)
            chosen: _Gpu | None = None
            for gpu in self._pick_two(candidates):
                if gpu.load < self.spec.batch and (chosen is None or gpu.load < chosen.load):
                    chosen = gpu
            if chosen is not None:
                return chosen
            if backed_off:  # the first retry is immediate, as in _choose_replicas_with_backoff
                await asyncio.sleep(_serve_backoff_s(attempt))
                attempt += 1
            backed_off = True

    def _serve_candidates(self, expert: str, context: _ServeRouting) -> list[_Gpu]:
        """MultiplexMixin.apply_multiplex_routing, in replica order (not a set: deterministic)."""
        timeout = self.rng.uniform(SERVE_MATCHING_TIMEOUT_S, 2 * SERVE_MATCHING_TIMEOUT_S)
        if self.loop.time() - context.start < timeout:
            candidates = [g for g in self.gpus if expert in g.serve_model_ids()]
            if (not candidates and expert not in self.fallback_match) or context.tried_first:
                candidates = self._fewest_models()
                self.fallback_match.add(expert)
            elif candidates:
                self.fallback_match.discard(expert)
            context.tried_first = True
            return candidates
        if not context.tried_fewest:
            context.tried_fewest = True
            return self._fewest_models()
        return list(self.gpus)

    def _fewest_models(self) -> list[_Gpu]:
        fewest = min(len(g.serve_model_ids()) for g in self.gpus)
        return [g for g in self.gpus if len(g.serve_model_ids()) == fewest]

    def _pick_two(self, candidates: list[_Gpu]) -> list[_Gpu]:
        n = len(candidates)
        if n <= 1:
            return candidates
        if n == 2:
            return candidates if self.rng.getrandbits(1) else candidates[::-1]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        return [candidates[i], candidates[j]]

    async def _run_multiplexed(self, gpu: _Gpu, request: Request) -> float:
        await self._serve_get_model(gpu, request.expert)
        gpu.running[request.expert] = gpu.running.get(request.expert, 0) + 1
        try:
            start = self.loop.time()
            await asyncio.sleep(self._service_s(request))
            return start
        finally:
            gpu.running[request.expert] -= 1
            if gpu.running[request.expert] == 0:
                for waiter in gpu.drain_waiters.pop(request.expert, []):
                    if not waiter.done():
                        waiter.set_result(None)

    async def _serve_get_model(self, gpu: _Gpu, expert: str) -> None:
        """_ModelMultiplexWrapper.load_model: LRU cache of models, one load at a time."""
        if expert in gpu.models:
            gpu.models.move_to_end(expert)
            return
        gpu.loading.add(expert)
        try:
            async with gpu.lock:
                if expert in gpu.models:
                    return
                if len(gpu.models) >= self.spec.hbm_experts:
                    victim, _ = gpu.models.popitem(last=False)
                    # Serve unloads it at once; its weights leave HBM when its requests end.
                    await self._drained(gpu, victim)
                await self._serve_load(gpu, expert)
                gpu.models[expert] = None
        finally:
            gpu.loading.discard(expert)

    async def _drained(self, gpu: _Gpu, model: str) -> None:
        while gpu.running.get(model, 0) > 0:
            waiter: asyncio.Future[None] = self.loop.create_future()
            gpu.drain_waiters.setdefault(model, []).append(waiter)
            await waiter

    async def _serve_load(self, gpu: _Gpu, expert: str) -> None:
        if self.spec.multiplex_load == "tiered":
            await self.move_in(gpu, expert)
            return
        await asyncio.sleep(self.moves.cold_start_s)  # a fresh engine for the model
        self.run.cold_starts += 1
        self.run.swaps += 1
        self.run.swap_times.append(self.loop.time())


def _serve_backoff_s(attempt: int) -> float:
    """RequestRouter._compute_backoff_s: doubling from 25 ms, at most 0.5 s."""
    if attempt >= 32:  # the doubling has long passed the ceiling (and would overflow)
        return SERVE_MAX_BACKOFF_S
    return min(SERVE_INITIAL_BACKOFF_S * SERVE_BACKOFF_MULTIPLIER**attempt, SERVE_MAX_BACKOFF_S)


def simulate(
    policy: PolicyName,
    trace: Trace,
    spec: ClusterSpec,
    moves: Moves,
    gpus: int | None = None,
    *,
    slo_s: float | None = None,
) -> SimRun:
    """Replay the trace under one policy on ``gpus`` GPUs (default: the whole cluster). With
    ``slo_s`` the run stops once its p99 time to first token is sure to miss it."""
    loop = _VirtualLoop()
    try:
        sim = _Sim(policy, trace, spec, moves, gpus or spec.gpus, slo_s=slo_s, loop=loop)
        loop.run_until_complete(sim.main())
        return sim.run
    finally:
        _cancel_all(loop)
        loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Stop what a run stopped early left behind (cancelling may start more: repeat)."""
    for _ in range(100):
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    raise RuntimeError("the simulation would not stop")


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class PolicyFigures:
    policy: str
    gpus: int
    goodput_rps: float  # requests per second of trace whose first token came within the SLO
    slo_attainment: float
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    swaps: int  # moves of an expert into a GPU's HBM (Serve: model loads)
    disk_loads: int  # DISK -> HOST reads (and reads straight into an engine)
    cold_starts: int  # engine starts during the trace
    gpus_for_slo: int | None  # the fewest GPUs that meet the SLO (None: not within max_gpus)
    at_slo_gpus: dict[str, float | int] | None  # p99 and swaps of that run
    # Each GPU count the search ran: its p99 time to first token, or None where the run
    # stopped as soon as the SLO was certainly missed.
    probes: dict[int, float | None] = field(default_factory=dict)


def _figures(run: SimRun, trace: Trace, slo_s: float) -> PolicyFigures:
    within = sum(1 for t in run.ttft_s if t <= slo_s)
    return PolicyFigures(
        policy=run.policy,
        gpus=run.gpus,
        goodput_rps=round(within / max(trace.duration_s, 1e-9), 3),
        slo_attainment=round(within / max(1, len(run.ttft_s)), 4),
        ttft_p50_s=round(run.ttft_p(0.5), 3),
        ttft_p99_s=round(run.ttft_p(0.99), 3),
        e2e_p50_s=round(run.e2e_p(0.5), 3),
        e2e_p99_s=round(run.e2e_p(0.99), 3),
        swaps=run.swaps,
        disk_loads=run.disk_loads,
        cold_starts=run.cold_starts,
        gpus_for_slo=None,
        at_slo_gpus=None,
    )


def gpu_counts(policy: PolicyName, experts: int, step: int, max_gpus: int) -> list[int]:
    """The cluster sizes the SLO search may try, smallest first."""
    sizes = list(range(step, max_gpus + 1, step))
    if policy == "static":  # one engine per expert at least
        sizes = sorted({experts, *(s for s in sizes if s > experts)})
        sizes = [s for s in sizes if s <= max(max_gpus, experts)]
    return sizes


def gpus_for_slo(
    runner: Callable[[int], SimRun], sizes: Sequence[int], slo_s: float
) -> SimRun | None:
    """The run of the fewest GPUs that meets the SLO (binary search over ``sizes``)."""
    if not sizes:
        return None
    best = runner(sizes[-1])
    if not best.meets(slo_s):
        return None
    lo, hi = 0, len(sizes) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        run = runner(sizes[mid])
        if run.meets(slo_s):
            best, hi = run, mid
        else:
            lo = mid + 1
    return best


@dataclass
class ClusterBench:
    inputs: dict[str, Any]
    trace: dict[str, Any]
    policies: dict[str, PolicyFigures]
    gpu_saving_vs_static: float | None  # 1 - residency GPUs / static GPUs, both at the SLO
    swaps_vs_multiplex: float | None  # residency swaps / multiplex swaps, full cluster
    targets: dict[str, bool | None]
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_cluster_bench(
    trace_spec: TraceSpec,
    spec: ClusterSpec,
    moves: Moves,
    *,
    slo_s: float = 5.0,
    gpu_step: int | None = None,
    max_gpus: int | None = None,
) -> ClusterBench:
    t0 = time.perf_counter()
    trace = make_trace(trace_spec)
    step = gpu_step or spec.gpus_per_node
    ceiling = max_gpus or 2 * spec.gpus
    figures: dict[str, PolicyFigures] = {}
    for name in POLICIES:
        cache: dict[int, SimRun] = {}

        def runner(gpus: int, name: PolicyName = name, cache: dict[int, SimRun] = cache) -> SimRun:
            if gpus not in cache:
                cache[gpus] = simulate(name, trace, spec, moves, gpus, slo_s=slo_s)
            return cache[gpus]

        full = simulate(name, trace, spec, moves, max(spec.gpus, _least(name, trace)))
        cache[full.gpus] = full
        result = _figures(full, trace, slo_s)
        found = gpus_for_slo(runner, gpu_counts(name, trace_spec.experts, step, ceiling), slo_s)
        result.probes = {
            gpus: None if run.decided_fail else round(run.ttft_p(0.99), 3)
            for gpus, run in sorted(cache.items())
        }
        if found is not None:
            result.gpus_for_slo = found.gpus
            result.at_slo_gpus = {"ttft_p99_s": round(found.ttft_p(0.99), 3), "swaps": found.swaps}
        figures[name] = result
    res, mux, static = figures["residency"], figures["multiplex"], figures["static"]
    saving = None
    if res.gpus_for_slo is not None and static.gpus_for_slo is not None:
        saving = round(1 - res.gpus_for_slo / static.gpus_for_slo, 4)
    swaps_ratio = round(res.swaps / mux.swaps, 4) if mux.swaps else None
    return ClusterBench(
        inputs={
            "cluster": asdict(spec),
            "trace": {**asdict(trace_spec), "mix": dict(trace_spec.mix)},
            "moves": asdict(moves),
            "slo_ttft_p99_s": slo_s,
            "gpu_step": step,
            "max_gpus": ceiling,
        },
        trace=_trace_summary(trace),
        policies=figures,
        gpu_saving_vs_static=saving,
        swaps_vs_multiplex=swaps_ratio,
        targets={
            "gpu_saving_ge_30pct": None if saving is None else saving >= 0.30,
            "fewer_swaps_than_multiplex": res.swaps < mux.swaps,
        },
        wall_s=round(time.perf_counter() - t0, 2),
    )


def _least(policy: PolicyName, trace: Trace) -> int:
    return len(trace.popularity) if policy == "static" else 1


def _trace_summary(trace: Trace) -> dict[str, Any]:
    counts: dict[str, int] = {}
    categories = dict.fromkeys(trace.groups, 0)
    for r in trace.requests:
        counts[r.expert] = counts.get(r.expert, 0) + 1
        categories[r.category] = categories.get(r.category, 0) + 1
    n = max(1, len(trace.requests))
    return {
        "requests": len(trace.requests),
        "duration_s": round(trace.duration_s, 1),
        "offered_rps": round(len(trace.requests) / max(trace.duration_s, 1e-9), 2),
        "experts_per_category": {c: len(m) for c, m in trace.groups.items()},
        "requests_per_category": categories,
        "top_expert_share": round(max(counts.values(), default=0) / n, 4),
        "experts_requested": len(counts),
    }


def with_moves(spec_moves: Moves, overrides: Mapping[str, float | None]) -> Moves:
    """``spec_moves`` with the figures given (not None) replaced."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(spec_moves, **given) if given else spec_moves
