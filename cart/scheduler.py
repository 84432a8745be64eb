"""Continuous batching for ``cart serve``: one decode thread over an engine's running batch.

Requests are queued by the server's event loop and join the running batch between decode
steps (iteration-level, "continuous" batching); a request leaves the batch at the step it
finishes, so a short answer never waits for a long one and a newcomer never waits for a whole
batch to drain. Requests on different cartridges, or on none, share every decode step.

Why continuous rather than static batches: on a server, requests arrive at different times and
stop at different lengths; with static batches a request waits for the batch in flight to end
and then for the slowest answer of its own batch. The price here is that a newcomer's prefill
runs between two decode steps of the others (no chunked prefill), which delays their next token
by the length of that prefill -- short for cartridge requests, whose prompts are just the
question.

Events go back through a callback per request, called on the decode thread (the server hands
them to its event loop).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cart.engines.base import Engine, GenerationRequest, RunningBatch

log = logging.getLogger("cart.serve")


class Overloaded(Exception):
    """No room for the request (429), or the server is shutting down (503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Ticket:
    """A submitted request. ``on_event(token_id, done, reason, error)`` is called for every
    generated token (reason when done: eos, length, loop; or cancelled), or once with an error
    message if the engine failed."""

    request: GenerationRequest
    seed: int
    on_event: Callable[[int | None, bool, str | None, str | None], None]
    row: Any = None  # its row of the running batch (RunningBatch.add), once admitted
    cancelled: bool = False
    done: bool = False


@dataclass
class SchedulerStats:
    steps: int = 0
    tokens: int = 0
    requests: int = 0
    kv_bytes: int = 0  # held by the running batch now
    kv_bytes_peak: int = 0
    batch_peak: int = 0


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, max_pending: int = 64):
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        self.engine = engine
        self.max_batch = max_batch  # rows decoded together
        self.max_pending = max_pending  # running + waiting; more is refused with 429
        self.stats = SchedulerStats()
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # id(row) -> ticket
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._batch: RunningBatch = engine.open_batch()
        self._thread = threading.Thread(target=self._loop, name="cart-decode", daemon=True)
        self._thread.start()

    # -- the server's side ----------------------------------------------------------------
    def submit(self, request: GenerationRequest, seed: int,
               on_event: Callable[[int | None, bool, str | None, str | None], None]) -> Ticket:
        ticket = Ticket(request, seed, on_event)
        with self._cond:
            if self._closing:
                raise Overloaded(503, "the server is shutting down")
            pending = len(self._waiting) + len(self._running)
            if pending >= self.max_pending:
                raise Overloaded(429, f"too many requests in flight ({pending}; the limit is "
                                      f"{self.max_pending}, --max-concurrent): retry later")
            self._waiting.append(ticket)
            self.stats.requests += 1
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for a request (client gone, or a stop string matched)."""
        with self._cond:
            if not ticket.done:
                ticket.cancelled = True
                self._cond.notify()

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let every admitted and waiting one finish, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting and not self._running, timeout)
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the decode thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                # (a cancelled request is still in _running until this thread drops it)
                self._cond.wait_for(lambda: self._stopped or self._waiting or self._running)
                if self._stopped and not self._waiting and not self._running:
                    return
                gone = [t for t in self._running.values() if t.cancelled]
                for t in gone:
                    del self._running[id(t.row)]
                    t.done = True
                for t in [t for t in self._waiting if t.cancelled]:
                    self._waiting.remove(t)
                    t.done = True
                room = self.max_batch - len(self._running)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            if gone:
                self._batch.drop([t.row for t in gone])
            if joining:
                admitted = self._admit(joining)
                with self._cond:
                    for t, row in admitted:
                        t.row = row
                        self._running[id(row)] = t
            try:
                events = self._batch.step()
            except Exception as e:  # an engine failure fails its requests, not the server
                log.exception("decode step failed")
                self._fail([], f"generation failed: {type(e).__name__}: {e}")
                continue
            self.stats.steps += 1
            self.stats.tokens += len(events)
            self.stats.batch_peak = max(self.stats.batch_peak, len(events))
            kv = self._batch.kv_bytes()
            self.stats.kv_bytes = kv
            self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, kv)
            with self._cond:
                tickets = [self._running.get(id(ev.row)) for ev in events]
                for ev, t in zip(events, tickets):
                    if ev.done and t is not None:
                        del self._running[id(ev.row)]
                        t.done = True
                if not self._running and not self._waiting:
                    self._cond.notify_all()  # close() may be waiting for the drain
            for ev, t in zip(events, tickets):
                if t is not None and not t.cancelled:
                    if ev.error is not None:  # this row alone failed (e.g. NaN scores)
                        log.warning("request failed: %s", ev.error)
                        t.on_event(None, True, None, f"generation failed: {ev.error}")
                    else:
                        t.on_event(ev.token_id, ev.done, ev.reason, None)

    def _admit(self, joining: list[Ticket]) -> list[tuple[Ticket, Any]]:
        """Prefill the newcomers into the batch. If that fails (the batch is untouched then),
        each is tried alone, so only the request that cannot run gets the error."""
        try:
            return list(zip(joining, self._batch.add([t.request for t in joining],
                                                     [t.seed for t in joining])))
        except Exception as e:
            if len(joining) > 1:
                return [pair for t in joining for pair in self._admit([t])]
            log.warning("request refused by the engine: %s: %s", type(e).__name__, e)
            self._fail(joining, f"generation failed: {type(e).__name__}: {e}", everyone=False)
            return []

    def _fail(self, tickets: list[Ticket], message: str, everyone: bool = True) -> None:
        """Fail ``tickets`` -- and, with ``everyone``, every running request, starting over
        with an empty batch (after a failed step its state is unknown)."""
        with self._cond:
            failed = list(tickets)
            if everyone:
                failed += self._running.values()
                self._running.clear()
            for t in failed:
                t.done = True
            self._cond.notify_all()
        if everyone:
            self._batch = self.engine.open_batch()
        for t in failed:
            t.on_event(None, True, None, message)
