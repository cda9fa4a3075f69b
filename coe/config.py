"""The schema of experts.yaml and the code that loads it.

Every error a user can make in the file is reported as one line per problem, naming the file,
the key path (``categories[3].expert``) and what was expected, so the fix is obvious without
reading this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model

from coe.engines.base import EngineKind
from coe.engines.registry import DEFAULT_ENGINE_KIND, ENGINE_KINDS
from coe.engines.remote import RemoteOptions as RemoteOptions
from coe.engines.vllm_local import VllmOptions as VllmOptions
from coe.errors import ConfigurationError
from coe.paths import models_dir, request_log_default

DEFAULT_CONFIG_ENV = "COE_CONFIG"
# The default pool that ships with the project (the checkout coe is installed from, editable).
PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "experts.yaml"

# A model reference with this prefix names a model that `coe models prepare` builds under COE_HOME.
PREPARED_PREFIX = "coe:"


class ConfigError(ConfigurationError):
    """experts.yaml is unreadable or invalid. ``problems`` holds one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo like `max_token:` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    """Default sampling for an expert; a request may override any field."""

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None


class Deadlines(_Strict):
    """How long a request may wait on an expert, in seconds. A request past one is cancelled
    (aborted in its engine) and answered with an error: 504 for first_token_s and total_s, 503
    for queue_s. Each expert a request tries (see `fallbacks:`) gets its own."""

    # From asking the expert to its first token: a hung engine is given up on after this.
    # Generous by default: a lazily started engine loads its model within it.
    first_token_s: float = Field(120.0, gt=0.0)
    # From asking the expert to the last token.
    total_s: float = Field(600.0, gt=0.0)
    # Waiting in the weight cache's queue for a slot that holds the expert (cache.hbm_bytes).
    queue_s: float = Field(60.0, gt=0.0)


class DeadlineOverrides(_Strict):
    """An expert's own deadlines; a key left out takes the pool's (top-level `deadlines:`)."""

    first_token_s: float | None = Field(None, gt=0.0)
    total_s: float | None = Field(None, gt=0.0)
    queue_s: float | None = Field(None, gt=0.0)


class Expert(_Strict):
    """The keys every expert entry has. Each engine kind (coe.engines.registry) adds its own:
    an entry is the ExpertEntry variant its `engine:` names (vllm when absent)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    # A path (absolute, or relative to experts.yaml), a Hugging Face repo id, or `coe:NAME` for a
    # model built by `coe models prepare`. Required by vllm, unused by remote experts.
    model: str | None = None
    engine: str = DEFAULT_ENGINE_KIND
    max_model_len: int = Field(2048, ge=16)
    system_prompt: str | None = None
    # chat: the model's chat template. qa: a plain Question/Answer transcript, for base models.
    prompt_format: Literal["chat", "qa"] = "chat"
    sampling: Sampling = Sampling()
    deadlines: DeadlineOverrides = DeadlineOverrides()
    params: int | None = Field(None, ge=1, description="parameter count")
    bytes: int | None = Field(None, ge=1, description="weight bytes at the serving dtype")


def _entry_model(kind: type[EngineKind]) -> type[Expert]:
    """The schema of an entry of this kind: the common keys, the kind's own, `engine: <name>`."""
    model: type[Expert] = create_model(
        f"{kind.name.capitalize()}Expert",
        __base__=(kind.fields, Expert),
        __module__=__name__,
        engine=(Literal[kind.name], kind.name),
    )
    return model


# The entry schema of each engine kind, by its `engine:` name.
EXPERT_ENTRIES: dict[str, type[Expert]] = {
    name: _entry_model(kind) for name, kind in ENGINE_KINDS.items()
}
_UNKNOWN_ENGINE = "unknown_engine"


def _engine_of(entry: Any) -> str | None:
    """Which variant validates an entry: its `engine:` (vllm when absent; not a mapping: vllm,
    whose validation then says a mapping was expected)."""
    engine = (
        entry.get("engine", DEFAULT_ENGINE_KIND)
        if isinstance(entry, dict)
        else getattr(entry, "engine", DEFAULT_ENGINE_KIND)
    )
    # Anything but a registered name (a number, a list) is reported as an unknown engine.
    return engine if isinstance(engine, str) else None


_TAGGED_ENTRIES = tuple(Annotated[m, Tag(name)] for name, m in EXPERT_ENTRIES.items())
# An expert entry of any kind. Union[...] rather than `|`: the members are only known at run time.
ExpertEntry = Annotated[
    Union[_TAGGED_ENTRIES],  # noqa: UP007
    Discriminator(
        _engine_of,
        custom_error_type=_UNKNOWN_ENGINE,
        custom_error_message="Input should be "
        + " or ".join(f"'{name}'" for name in EXPERT_ENTRIES),
    ),
]


class Category(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    expert: str
    # How prompts of this category are shaped for the expert: a name in coe/prompts/registry.py,
    # which checks it (this layer sits below the strategies and cannot list them).
    strategy: str = "none"
    # expert_prompting: the category's expert identity, in the second person ("You are ...").
    # Used as is in static mode, and as the fallback in generated mode. None: one written from
    # the description.
    identity: str | None = None
    # mixture_of_prompts: the folder `coe prompts fit` wrote, relative to experts.yaml.
    prompts: str | None = None
    # Experts that answer, in this order, when the category's expert fails before its first
    # token (engine down, a first-token or queue deadline missed). Never after text was sent.
    fallbacks: list[str] = []


class ExpertPromptingSettings(_Strict):
    # static: the category's identity, no extra call. generated: an identity written for each
    # prompt by `writer` (cached in the store by prompt), the static one if it takes too long.
    mode: Literal["static", "generated"] = "static"
    # The expert that writes identities; None: the fallback category's expert.
    writer: str | None = None
    budget_s: float = Field(1.5, gt=0.0)
    max_tokens: int = Field(64, ge=8)
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)


class MixtureSettings(_Strict):
    # The nearest demos of the prompt's region go before it, up to this many tokens in all ...
    demo_tokens: int = Field(384, ge=0)
    # ... and at most this many.
    max_demos: int = Field(3, ge=0)


class StrategySettings(_Strict):
    expert_prompting: ExpertPromptingSettings = ExpertPromptingSettings()
    mixture_of_prompts: MixtureSettings = MixtureSettings()


class RouterSettings(_Strict):
    # Folder with the router artifacts, relative to experts.yaml. None: no learned router yet, every
    # request without an explicit expert goes to the fallback category.
    path: str | None = None
    fallback: str = "general"
    # None: use the threshold chosen by cross-validation when the router was fitted.
    threshold: float | None = Field(None, ge=0.0, le=1.0)


class CacheBudgets(_Strict):
    """The three-tier weight cache (coe/cache). Experts whose checkpoints share an architecture
    share slots (live engines) and swap weights in place when there are fewer slots than experts.
    """

    # Accelerator memory for all slots: each slot costs its largest expert's bytes plus
    # kv_bytes_per_slot. None: one slot per distinct checkpoint (everything resident, no swaps).
    hbm_bytes: int | None = Field(None, ge=0)
    # KV cache reserved per slot; None: the expert's vllm.cpu_kv_cache_gib.
    kv_bytes_per_slot: int | None = Field(None, ge=0)
    # Host RAM for experts' weights outside the slots. None: 40% of this machine's RAM.
    host_bytes: int | None = Field(None, ge=0)
    # Scheduler: once another expert's oldest request has waited this long, the slot stops
    # admitting new requests for its resident expert and switches when they finish.
    max_wait_s: float = Field(2.0, gt=0.0)
    # Eviction: request rates are averaged with this half-life.
    rate_half_life_s: float = Field(120.0, gt=0.0)


class StoreSettings(_Strict):
    # redis://host:port/db, or None for the in-process store (single process only).
    url: str | None = None


class RateLimits(_Strict):
    """Per API key, per minute. None: unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    # Prompt plus completion tokens; a request is admitted while the key has tokens left, and its
    # usage is charged when it finishes.
    tokens_per_minute: int | None = Field(None, ge=1)


class GatewayLimits(RateLimits):
    """The gateway's default limits (a key without its own gets these), and what every limit
    does while the store (Redis) does not answer."""

    # open: admit requests unchecked (limits off during the outage). closed: answer 503 with
    # Retry-After to requests that have limits. None: closed when the gateway has API keys
    # (here or in $COE_API_KEYS), open when it has none.
    on_store_error: Literal["open", "closed"] | None = None

    def store_error_policy(self, has_keys: bool) -> Literal["open", "closed"]:
        if self.on_store_error is not None:
            return self.on_store_error
        return "closed" if has_keys else "open"


class ApiKey(_Strict):
    """A client key of the gateway. Only its SHA-256 is kept (`coe keys new` makes one)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # None: the gateway's default limits.
    limits: RateLimits | None = None
    # May change the pool while it serves (/admin: reload experts.yaml, load or unload adapters).
    admin: bool = False


class ResponseCacheSettings(_Strict):
    enabled: bool = True
    ttl_s: int = Field(3600, ge=1)
    # Also cache requests that sample (temperature > 0 without a seed): repeats get the same text.
    nondeterministic: bool = False
    # Share answers between API keys. Off: each key has its own entries, so no client can learn
    # from a cache hit what another one asked.
    shared: bool = False


class GatewaySettings(_Strict):
    """`coe serve`: the OpenAI-compatible HTTP gateway."""

    # No keys (here or in $COE_API_KEYS): no authentication, for local use.
    api_keys: list[ApiKey] = []
    limits: GatewayLimits = GatewayLimits()
    response_cache: ResponseCacheSettings = ResponseCacheSettings()
    # A multi-turn conversation stays with the expert that answered it for this long.
    session_ttl_s: int = Field(3600, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)


class RequestLogSettings(_Strict):
    """The request log: one row per request through the orchestrator (`coe logs` reads it)."""

    enabled: bool = True
    # What of each prompt (the last user turn) is kept: its text (keep), only its SHA-256 (hash),
    # or nothing (none). The hash lets repeats be told apart without storing what was asked.
    prompts: Literal["keep", "hash", "none"] = "keep"
    # The SQLite file; relative to experts.yaml. Unset: $COE_LOG_DB, else
    # $COE_HOME/logs/requests.sqlite: one log for every pool of this user (each row names its
    # experts.yaml).
    path: str | None = None


class ActorOptions(_Strict):
    """What one Ray Serve replica needs of a node (Ray's `ray_actor_options`): CPUs, GPUs, memory
    and custom resources, by which replicas are placed on the nodes that offer them."""

    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float | None = Field(None, ge=0.0)
    memory: int | None = Field(None, ge=0, description="bytes")
    resources: dict[str, float] = {}
    # Environment of the replica's process (and the engine process vLLM spawns from it): Ray
    # sets OMP_NUM_THREADS from num_cpus, so engine thread counts belong here.
    env: dict[str, str] = {}


# The Serve deployment name of the gateway (expert deployments take theirs from experts.yaml).
GATEWAY_DEPLOYMENT = "gateway"


class ClusterGateway(_Strict):
    """The gateway as a Serve deployment: replicas share Redis (store.url) for the response
    cache, rate limits and sessions."""

    replicas: int = Field(2, ge=1)
    actor: ActorOptions = ActorOptions(num_cpus=0.5)


class ClusterDeployment(_Strict):
    """One Serve deployment of experts: each replica runs coe's own engines and weight cache for
    the experts listed (a slot group when they swap through the cache)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
    experts: list[str] = Field(min_length=1)
    replicas: int = Field(1, ge=1)
    # Autoscaling bounds; both unset: a fixed count of `replicas`.
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int = Field(32, ge=1)
    actor: ActorOptions = ActorOptions(num_cpus=1)


class ClusterSettings(_Strict):
    """`coe serve --ray`: the pool as Ray Serve deployments on a Ray cluster."""

    # A running cluster to join (ray://… or host:port of its GCS); unset: `coe serve --ray`
    # starts a one-node cluster of its own on loopback.
    address: str | None = None
    # How a request picks an expert replica: where its weights are (residency), Serve's model
    # multiplexing, or Serve's default power of two choices (the baselines).
    routing: Literal["residency", "multiplex", "power_of_two"] = "residency"
    # How often replicas report what they hold and their queue (Serve's record_routing_stats).
    stats_period_s: float = Field(1.0, gt=0.0)
    gateway: ClusterGateway = ClusterGateway()
    # Unset: one deployment named `experts` with every in-process expert, one replica.
    deployments: list[ClusterDeployment] = []


class PoolConfig(_Strict):
    version: Literal[1] = 1
    experts: list[ExpertEntry] = Field(min_length=1)
    categories: list[Category] = Field(min_length=1)
    router: RouterSettings = RouterSettings()
    cache: CacheBudgets = CacheBudgets()
    store: StoreSettings = StoreSettings()
    gateway: GatewaySettings = GatewaySettings()
    strategies: StrategySettings = StrategySettings()
    # The pool's deadlines; an expert's `deadlines:` overrides any of them.
    deadlines: Deadlines = Deadlines()
    cluster: ClusterSettings = ClusterSettings()
    log: RequestLogSettings = RequestLogSettings()

    # Set by the loader, not by the file.
    source: Path | None = Field(None, exclude=True)

    def expert(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(name)

    def deadlines_for(self, name: str) -> Deadlines:
        """An expert's deadlines: its own keys, the pool's for the rest."""
        own = self.expert(name).deadlines.model_dump(exclude_none=True)
        return self.deadlines.model_copy(update=own)

    def fallbacks_for(self, category: str | None) -> list[str]:
        """The experts that stand in, in order, for a category's expert that is down."""
        if category is None or category not in self.category_names:
            return []
        return list(self.category(category).fallbacks)

    @property
    def cluster_deployments(self) -> list[ClusterDeployment]:
        """The expert deployments on a Ray cluster: those written, else one named `experts` that
        holds every expert whose engine runs in process (remote experts are called from the
        gateway replicas)."""
        if self.cluster.deployments:
            return list(self.cluster.deployments)
        local = [e.name for e in self.experts if ENGINE_KINDS[e.engine].in_process]
        return [ClusterDeployment(name="experts", experts=local)] if local else []

    def only_experts(self, names: Iterable[str]) -> PoolConfig:
        """This pool with only the named experts (what one expert deployment's replica serves).
        Categories may then name experts it lacks: use it for engines, not for routing."""
        keep = set(names)
        return self.model_copy(update={"experts": [e for e in self.experts if e.name in keep]})

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def fallback_expert(self) -> str:
        """The fallback category's expert: it answers whatever the router cannot place."""
        return self.category(self.router.fallback).expert

    @property
    def identity_writer(self) -> str:
        """The expert that writes generated identities: the one named, else the fallback's."""
        return self.strategies.expert_prompting.writer or self.fallback_expert

    def resolve_path(self, ref: str) -> Path:
        """A path from the file, relative to experts.yaml unless absolute."""
        path = Path(os.path.expanduser(ref))
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    @property
    def request_log_path(self) -> Path:
        """The request log's SQLite file: ``log.path``, else the user's one under COE_HOME."""
        if self.log.path is None:
            return request_log_default()
        return self.resolve_path(self.log.path)

    def resolve_model(self, expert: Expert) -> str:
        """Where the engine finds an expert's model: an existing path, or a hub id as written."""
        assert expert.model is not None
        ref = expert.model
        if ref.startswith(PREPARED_PREFIX):
            return str(models_dir() / ref[len(PREPARED_PREFIX) :])
        path = Path(os.path.expanduser(ref))
        if not path.is_absolute() and self.source is not None:
            relative = self.source.parent / path
            if relative.exists():
                return str(relative)
        return str(path) if path.exists() else ref


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = _walk(model, error["loc"])[0]
    kind = error["type"]
    got = error.get("input")
    if kind == _UNKNOWN_ENGINE:
        # Reported at the entry; the entry's `engine:` is what is wrong.
        loc = [*loc, "engine"]
        got = got.get("engine") if isinstance(got, dict) else got
    where = _key_path(loc)
    if kind == "extra_forbidden":
        parent = error["loc"][:-1]
        allowed = _allowed_keys(model, parent)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        # A key of an expert entry may belong to another engine kind (`vllm:` on a remote one).
        tag = parent[-1] if parent else None
        if isinstance(tag, str) and tag in _variants(_walk(model, parent[:-1])[1]):
            hint = f" with engine '{tag}'{hint}"
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{where}: {error['msg']}{shown}"


def _walk(model: type[BaseModel], loc: Iterable[Any]) -> tuple[list[Any], Any]:
    """Follow a validation error's ``loc`` through the schema. Returns the key path as the file
    spells it, without the tags pydantic puts in for a discriminated union (the `vllm` of
    ``("experts", 0, "vllm", "sampling")``), and the annotation at its end (None off the schema).
    """
    path: list[Any] = []
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        variant = _variants(current).get(part)
        if variant is not None:
            current = variant
            continue
        path.append(part)
        inner = _inner_model(current)
        field = inner.model_fields.get(part) if inner is not None else None
        current = field.annotation if field is not None else None
    return path, current


def _allowed_keys(model: type[BaseModel], loc: Iterable[Any]) -> list[str]:
    """The keys that are valid at ``loc`` (a validation error's, tags included)."""
    current = _inner_model(_walk(model, loc)[1])
    fields = current.model_fields if current is not None else {}
    return [name for name, f in fields.items() if not f.exclude]


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _variants(annotation: Any) -> dict[str, Any]:
    """The members of a discriminated union inside ``annotation`` (e.g. list[ExpertEntry]), by
    tag; empty at a model, whose fields are not looked into."""
    if annotation is None or isinstance(annotation, type):
        return {}
    if get_origin(annotation) is Annotated:
        inner, *metadata = get_args(annotation)
        tags = [m.tag for m in metadata if isinstance(m, Tag)]
        return {tags[0]: inner} if tags else _variants(inner)
    found: dict[str, Any] = {}
    for arg in get_args(annotation):
        found.update(_variants(arg))
    return found


def _cross_checks(cfg: PoolConfig) -> list[str]:
    """Rules that span several keys: references between experts and categories, uniqueness."""
    problems: list[str] = []
    experts = cfg.expert_names
    for i, name in enumerate(experts):
        if name in experts[:i]:
            problems.append(
                f"experts[{i}].name: '{name}' is defined twice; expert names are unique"
            )
    for i, e in enumerate(cfg.experts):
        if e.name == "auto":
            problems.append(
                f"experts[{i}].name: 'auto' is reserved (the gateway's routed model); rename it"
            )
        problems.extend(f"experts[{i}].{p}" for p in ENGINE_KINDS[e.engine].check(e))
    for i, e in enumerate(cfg.experts):
        # Checks against the rest of the pool (a LoRA expert's base), for kinds that have them.
        check_pool = getattr(ENGINE_KINDS[e.engine], "check_pool", None)
        if check_pool is not None and not any(p.startswith(f"experts[{i}].") for p in problems):
            problems.extend(f"experts[{i}].{p}" for p in check_pool(cfg, e))
    cats = cfg.category_names
    for i, c in enumerate(cfg.categories):
        if c.name in cats[:i]:
            problems.append(f"categories[{i}].name: '{c.name}' is defined twice")
        if c.expert not in experts:
            problems.append(
                f"categories[{i}].expert: '{c.expert}' is not a defined expert "
                f"(defined: {', '.join(experts)})"
            )
    for i, c in enumerate(cfg.categories):
        for j, name in enumerate(c.fallbacks):
            where = f"categories[{i}].fallbacks[{j}]"
            if name not in experts:
                problems.append(
                    f"{where}: '{name}' is not a defined expert (defined: {', '.join(experts)})"
                )
            elif name == c.expert:
                problems.append(f"{where}: '{name}' is the category's own expert")
            elif name in c.fallbacks[:j]:
                problems.append(f"{where}: '{name}' is listed twice")
    # Both deadlines written in one section, the first-token one past the total: a slip (the
    # total one would always end the request first). A small total_s alone is fine.
    sections: list[tuple[str, Deadlines | DeadlineOverrides]] = [("deadlines", cfg.deadlines)]
    sections += [(f"experts[{i}].deadlines", e.deadlines) for i, e in enumerate(cfg.experts)]
    for where, section in sections:
        if {"first_token_s", "total_s"} <= section.model_fields_set:
            first, total = section.first_token_s, section.total_s
            if first is not None and total is not None and first > total:
                problems.append(
                    f"{where}.first_token_s: {first:g} s is longer than total_s ({total:g} s)"
                )
    key_names = [k.name for k in cfg.gateway.api_keys]
    key_hashes = [k.sha256 for k in cfg.gateway.api_keys]
    for i, key in enumerate(cfg.gateway.api_keys):
        if key.name in key_names[:i]:
            problems.append(f"gateway.api_keys[{i}].name: '{key.name}' is used twice")
        if key.sha256 in key_hashes[:i]:
            first = key_names[key_hashes.index(key.sha256)]
            problems.append(
                f"gateway.api_keys[{i}].sha256: the same key as '{first}'; "
                "make a new one with `coe keys new`"
            )
    for i, c in enumerate(cfg.categories):
        if c.strategy == "mixture_of_prompts" and c.prompts is None:
            problems.append(
                f"categories[{i}].prompts: required when strategy is mixture_of_prompts "
                f"(the folder `coe prompts fit DEMOS.jsonl --category {c.name} --out DIR` writes)"
            )
    writer = cfg.strategies.expert_prompting.writer
    if writer is not None and writer not in experts:
        problems.append(
            f"strategies.expert_prompting.writer: '{writer}' is not a defined expert "
            f"(defined: {', '.join(experts)})"
        )
    problems.extend(_cluster_checks(cfg))
    if cfg.log.path is not None and cfg.request_log_path.is_dir():
        problems.append(
            f"log.path: '{cfg.log.path}' is a folder; name the SQLite file in it "
            f"(e.g. {Path(cfg.log.path) / 'requests.sqlite'})"
        )
    if cfg.router.fallback not in cats:
        problems.append(
            f"router.fallback: '{cfg.router.fallback}' is not a defined category "
            f"(defined: {', '.join(cats)})"
        )
    return problems


def _cluster_checks(cfg: PoolConfig) -> list[str]:
    """Every in-process expert in exactly one deployment of `cluster:`, and sane bounds."""
    problems: list[str] = []
    experts = cfg.expert_names
    owner: dict[str, str] = {}
    names: list[str] = []
    for i, d in enumerate(cfg.cluster.deployments):
        where = f"cluster.deployments[{i}]"
        if d.name in names:
            problems.append(f"{where}.name: '{d.name}' is used twice")
        if d.name == GATEWAY_DEPLOYMENT:
            problems.append(f"{where}.name: '{d.name}' is the gateway's deployment; rename it")
        names.append(d.name)
        for j, name in enumerate(d.experts):
            if name not in experts:
                problems.append(
                    f"{where}.experts[{j}]: '{name}' is not a defined expert "
                    f"(defined: {', '.join(experts)})"
                )
            elif name in owner:
                problems.append(
                    f"{where}.experts[{j}]: '{name}' is already in deployment '{owner[name]}'; "
                    "an expert belongs to one deployment"
                )
            else:
                owner[name] = d.name
        low, high = d.min_replicas, d.max_replicas
        if (low is None) != (high is None):
            problems.append(
                f"{where}: set both min_replicas and max_replicas (autoscaling), or neither"
            )
        elif low is not None and high is not None and not low <= d.replicas <= high:
            problems.append(
                f"{where}.replicas: {d.replicas} is outside min_replicas..max_replicas "
                f"({low}..{high}); it is the count autoscaling starts from"
            )
    if cfg.cluster.deployments:
        for i, e in enumerate(cfg.experts):
            if ENGINE_KINDS[e.engine].in_process and e.name not in owner:
                problems.append(
                    f"experts[{i}]: '{e.name}' runs in process but no cluster.deployments entry "
                    "lists it; add it to one deployment's experts"
                )
    return problems


def parse_config(data: Any, source: Path | str) -> PoolConfig:
    """Validate already-parsed YAML. Raises ConfigError listing every problem found."""
    source = Path(source)
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with keys experts, categories"])
    try:
        cfg = PoolConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e, PoolConfig) for e in exc.errors()]) from None
    # The source first: checks of paths read them relative to the file.
    cfg = cfg.model_copy(update={"source": source.resolve()})
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: Path | str | None = None) -> PoolConfig:
    """Load experts.yaml: the given path, else $COE_CONFIG, ./experts.yaml, or the project's."""
    chosen, data = read_config_data(path)
    return parse_config(data, chosen)


def read_config_data(path: Path | str | None = None) -> tuple[Path, Any]:
    """experts.yaml as YAML data, unchecked (see load_config), with the path it was read from."""
    chosen = Path(path) if path else default_config_path()
    try:
        text = chosen.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(chosen, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        return chosen, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(chosen, [f"{where}not valid YAML: {problem}"]) from None


def default_config_path() -> Path:
    env = os.environ.get(DEFAULT_CONFIG_ENV)
    if env:
        return Path(env)
    local = Path.cwd() / "experts.yaml"
    return local if local.exists() else PROJECT_CONFIG
