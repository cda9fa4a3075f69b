"""Per-expert queues in front of a group of slots (engines that can hold any of the group's
experts), and the decision of when a slot switches experts.

- Requests for a slot's resident expert are admitted at once and run together (vLLM batches them).
- A slot switches when it has no requests in flight and another expert has requests waiting:
  the resident expert's queue has drained. Once another expert's oldest request has waited
  longer than ``max_wait_s`` the slot *drains*: it admits no more of its resident expert's
  requests, so the switch comes as soon as those in flight finish.
- The next expert is the one with an overdue request (oldest first), else the one with the most
  queued work per second of switch cost.
- A slot never switches while it has requests in flight.

The ``arrival`` policy is the naive baseline the pool benchmark compares against: strict arrival
order, switching whenever the next request's expert differs from the resident one.

Everything here is synchronous bookkeeping on the event loop except the switch itself, which the
``Switcher`` performs (moving weights) in a task of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from coe.cache import metrics
from coe.engines.base import DeadlineError, EngineError

Policy = Literal["grouped", "arrival"]
# Added to every switch estimate: a switch also resets the prefix cache and refills the batch.
SWITCH_OVERHEAD_S = 0.05


class SlotLike(Protocol):
    index: int
    in_flight: int

    @property
    def resident(self) -> str | None:
        """The expert whose weights the engine holds now; None when unknown (e.g. it crashed)."""
        ...


class Switcher(Protocol):
    def switch_seconds(self, expert: str) -> float: ...

    def can_serve(self, expert: str, slot: int) -> bool: ...

    async def make_resident(self, slot: SlotLike, expert: str) -> None: ...


@dataclass
class Ticket:
    expert: str
    work: int
    enqueued: float
    future: asyncio.Future[SlotLike] = field(repr=False)


@dataclass
class _SlotState:
    switching_to: str | None = None


class Scheduler:
    def __init__(
        self,
        slots: Sequence[SlotLike],
        switcher: Switcher,
        *,
        max_wait_s: float = 2.0,
        policy: Policy = "grouped",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.slots = list(slots)
        self.switcher = switcher
        self.max_wait_s = max_wait_s
        self.policy = policy
        self.clock = clock
        self.queues: dict[str, deque[Ticket]] = {}
        self._arrivals: deque[Ticket] = deque()  # all tickets in order (arrival policy)
        self._state = {s.index: _SlotState() for s in self.slots}
        self._timer: asyncio.TimerHandle | None = None
        self._switch_tasks: set[asyncio.Task[None]] = set()
        self.switches = 0

    # --- the caller's side -----------------------------------------------------------------------
    async def acquire(
        self, expert: str, work: int = 1, *, wait_s: float | None = None, name: str | None = None
    ) -> SlotLike:
        """Wait until a slot holds `expert` and admits this request; the caller must `release`.

        ``wait_s``: the queue deadline. A request not admitted by then leaves the queue and
        raises DeadlineError("queue") for expert ``name`` (default: ``expert``, the unit)."""
        ticket = Ticket(expert, work, self.clock(), asyncio.get_running_loop().create_future())
        self.queues.setdefault(expert, deque()).append(ticket)
        self._arrivals.append(ticket)
        self._publish(expert)
        self._dispatch()
        timeout = asyncio.timeout(wait_s)
        try:
            async with timeout:
                return await self._admitted(ticket)
        except TimeoutError:
            if not timeout.expired():
                raise
            assert wait_s is not None
            raise DeadlineError(name or expert, "queue", wait_s) from None

    async def _admitted(self, ticket: Ticket) -> SlotLike:
        try:
            return await ticket.future
        except asyncio.CancelledError:
            # Cancelled (the caller went away, or its queue deadline passed): give back a slot
            # granted at the same moment, or leave the queue.
            if ticket.future.done() and not ticket.future.cancelled():
                if ticket.future.exception() is None:
                    self.release(ticket.future.result())
            else:
                self._forget(ticket)
            raise

    def release(self, slot: SlotLike) -> None:
        slot.in_flight -= 1
        assert slot.in_flight >= 0, "released more requests than were admitted"
        self._dispatch()

    def dispatch(self) -> None:
        """Look at the slots again: one came back from a crash with weights to serve."""
        self._dispatch()

    def waiting(self, expert: str) -> int:
        return len(self.queues.get(expert, ()))

    def busy(self) -> set[str]:
        """Experts with requests waiting or a slot switching to them."""
        return {e for e, q in self.queues.items() if q} | self._incoming()

    async def close(self) -> None:
        for task in list(self._switch_tasks):
            task.cancel()
        for queue in self.queues.values():
            for ticket in queue:
                if not ticket.future.done():
                    ticket.future.set_exception(EngineError("the expert pool is shutting down"))
            queue.clear()
        self._arrivals.clear()
        if self._timer is not None:
            self._timer.cancel()

    # --- decisions
    def _dispatch(self) -> None:
        if self.policy == "arrival":
            self._dispatch_arrival()
        else:
            self._dispatch_grouped()

    def _dispatch_grouped(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if self._state[slot.index].switching_to is not None:
                continue
            resident = slot.resident
            others = self._candidates(slot)
            # Past the bound, the slot drains: the resident expert's new requests wait.
            overdue = any(now - self.queues[e][0].enqueued >= self.max_wait_s for e in others)
            # Another expert has more queued work per second of switching than the resident has
            # waiting: let the running batch finish and switch rather than queue more behind it.
            outweighed = resident is not None and any(
                self._value(e) > self._value(resident) for e in others
            )
            if resident is not None and not overdue and not outweighed:
                self._grant_all(resident, slot)
            if others and slot.in_flight == 0:
                self._start_switch(slot, self._pick(others, now))
        self._arm_timer(now)

    def _dispatch_arrival(self) -> None:
        while self._arrivals:
            head = self._arrivals[0]
            if head.future.done():
                self._arrivals.popleft()
                continue
            holder = self._holding(head.expert)
            if holder is not None:
                self._grant(head, holder)
                continue
            if head.expert in self._incoming():
                return
            idle = [
                s
                for s in self.slots
                if s.in_flight == 0
                and self._state[s.index].switching_to is None
                and self.switcher.can_serve(head.expert, s.index)
            ]
            if idle:
                self._start_switch(idle[0], head.expert)
            return

    def _candidates(self, slot: SlotLike) -> list[str]:
        """Experts with waiting requests that this slot could switch to."""
        busy = self._incoming() | {s.resident for s in self.slots if s.resident is not None}
        return [
            e
            for e, queue in self.queues.items()
            if queue and e not in busy and self.switcher.can_serve(e, slot.index)
        ]

    def _pick(self, candidates: list[str], now: float) -> str:
        overdue = [e for e in candidates if now - self.queues[e][0].enqueued >= self.max_wait_s]
        if overdue:
            return min(overdue, key=lambda e: self.queues[e][0].enqueued)

        return max(candidates, key=lambda e: (self._value(e), -self.queues[e][0].enqueued))

    def _value(self, expert: str) -> float:
        """Queued work (tokens) per second it takes to switch to the expert (plus a fixed
        overhead, so a resident expert with no switch cost is not worth infinitely much)."""
        work = sum(t.work for t in self.queues.get(expert, ()))
        return work / (self.switcher.switch_seconds(expert) + SWITCH_OVERHEAD_S)

    def _holding(self, expert: str) -> SlotLike | None:
        for slot in self.slots:
            state = self._state[slot.index]
            if slot.resident == expert and state.switching_to is None:
                return slot
        return None

    def _incoming(self) -> set[str]:
        return {s.switching_to for s in self._state.values() if s.switching_to is not None}

    # --- actions
    def _grant_all(self, expert: str, slot: SlotLike) -> None:
        """Admit the expert's queued requests up to the slot's batch capacity: requests beyond it
        would only wait inside the engine, hidden from the choice of the next expert."""
        queue = self.queues.get(expert)
        capacity = getattr(slot, "capacity", None) or len(queue or ())
        while queue and slot.in_flight < capacity:
            self._grant(queue[0], slot)

    def _grant(self, ticket: Ticket, slot: SlotLike) -> None:
        self._forget(ticket)
        if not ticket.future.done():
            slot.in_flight += 1
            ticket.future.set_result(slot)

    def _forget(self, ticket: Ticket) -> None:
        queue = self.queues.get(ticket.expert)
        if queue and ticket in queue:
            queue.remove(ticket)
        if self._arrivals and ticket in self._arrivals:
            self._arrivals.remove(ticket)
        self._publish(ticket.expert)

    def _fail_queue(self, expert: str, error: EngineError) -> None:
        for ticket in list(self.queues.get(expert, ())):
            self._forget(ticket)
            if not ticket.future.done():
                ticket.future.set_exception(error)

    def _start_switch(self, slot: SlotLike, expert: str) -> None:
        assert slot.in_flight == 0, "a slot must not switch with requests in flight"
        self._state[slot.index].switching_to = expert
        task = asyncio.get_running_loop().create_task(self._switch(slot, expert))
        self._switch_tasks.add(task)
        task.add_done_callback(self._switch_tasks.discard)

    async def _switch(self, slot: SlotLike, expert: str) -> None:
        state = self._state[slot.index]
        try:
            await self.switcher.make_resident(slot, expert)
            self.switches += 1
            # The requests it was switched for run now, even if others are overdue by then:
            # otherwise two overdue experts would take the slot from each other forever.
            if self.policy == "grouped":
                self._grant_all(expert, slot)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, EngineError) else EngineError(str(exc))
            self._fail_queue(expert, error)
        finally:
            state.switching_to = None
        self._dispatch()

    def _arm_timer(self, now: float) -> None:
        """Wake up when the next waiting request becomes overdue, to start a drain then."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        resident = {s.resident for s in self.slots}
        # Requests already overdue are acted on when a slot's in-flight requests finish.
        due = [
            q[0].enqueued + self.max_wait_s
            for e, q in self.queues.items()
            if q and e not in resident and q[0].enqueued + self.max_wait_s > now
        ]
        if due:
            delay = min(due) - now + 1e-3
            self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _publish(self, expert: str) -> None:
        metrics.QUEUE_DEPTH.labels(expert).set(self.waiting(expert))
