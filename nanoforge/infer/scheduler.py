"""Dynamic batching for one model: a thread that drives the engine's step API (llama.cpp's slots).

Requests wait in a bounded queue; at every step the worker admits waiting requests into free slots
(`engine.add`), runs one `engine.step()` for all active rows, and hands each request its deltas. A finished
request leaves at once and its slot goes to the next one; a cancelled one (client gone) is dropped from the
engine. The engine is not thread-safe, so only this thread touches it. Nothing here knows HTTP.

    worker = ModelWorker(engine, max_batch=8, max_queue=64)
    ticket = worker.submit(prompt_ids, params, on_event)   # on_event(kind, ticket, payload) from the thread
    ...
    ticket.cancel()
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from nanoforge import progress


class QueueFull(Exception):
    """The worker's waiting queue is at its limit."""


class Ticket:
    """One request's place in the worker: its timings (perf_counter seconds) and token counts."""

    _ids = itertools.count()

    def __init__(self, worker: ModelWorker, prompt_ids: Sequence[int], params: Any,
                 on_event: Callable[[str, Ticket, Any], None]) -> None:
        self.id = next(self._ids)
        self.worker = worker
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.rid: Any = None
        self.position = 0
        self.t_submit = time.perf_counter()
        self.t_admit: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating (thread-safe; a no-op once finished)."""
        self.worker._cancel(self)

    def timing(self) -> tuple[float, float, float]:
        """(queued_ms, prompt_ms, predicted_ms): waiting, admission to first token, first token to end."""
        admit = self.t_admit or self.t_submit
        first = self.t_first or admit
        end = self.t_end or time.perf_counter()
        return (admit - self.t_submit) * 1e3, (first - admit) * 1e3, (end - first) * 1e3


class ModelWorker:
    """The thread that owns one engine. Events passed to a ticket's `on_event(kind, ticket, payload)`:
    "queued" (payload: 1-based position while waiting), "delta" (an engine Delta), "done" (finish reason),
    "error" (a message). Exactly one of "done"/"error" ends every ticket, also a cancelled one."""

    def __init__(self, engine: Any, *, max_batch: int = 8, max_queue: int = 64, name: str = "") -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.name = name
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._cancels: list[Ticket] = []
        self._active: dict[Any, Ticket] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"nanoforge-worker-{name}", daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: Any, on_event: Callable[[str, Ticket, Any], None]
               ) -> Ticket:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting."""
        with self._cond:
            if self._stop:
                raise RuntimeError(f"worker {self.name} is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for {self.name}")
            t = Ticket(self, prompt_ids, params, on_event)
            self._waiting.append(t)
            self._cond.notify()
        return t

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "slots": self.max_batch}

    def busy(self) -> bool:
        with self._cond:
            return bool(self._active or self._waiting)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing further: every pending ticket ends with an error, the thread exits."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def _cancel(self, t: Ticket) -> None:
        with self._cond:
            if t.finish_reason is None and not t.cancelled:
                t.cancelled = True
                self._cancels.append(t)
                self._cond.notify()

    # ---- the worker thread ------------------------------------------------------------------------------
    def _emit(self, t: Ticket, kind: str, payload: Any) -> None:
        try:
            t.on_event(kind, t, payload)
        except Exception as e:  # a broken consumer must not stop the model for everyone else
            progress.warn(f"serve: dropping an event for request {t.id}: {e}")

    def _finish(self, t: Ticket, reason: str) -> None:
        t.finish_reason = reason
        t.t_end = time.perf_counter()
        self._emit(t, "done", reason)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._cancels or self._active):
                    self._cond.wait()
                if self._stop:
                    pending = list(self._waiting) + list(self._active.values())
                    self._waiting.clear()
                    break
                cancels, self._cancels = self._cancels, []
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.max_batch:
                    t = self._waiting.popleft()
                    if not t.cancelled:
                        admit.append(t)
                moved = [(i + 1, t) for i, t in enumerate(self._waiting) if t.position != i + 1]
                for pos, t in moved:
                    t.position = pos
            for pos, t in moved:
                self._emit(t, "queued", pos)
            for t in cancels:
                if t.rid is not None and t.rid in self._active:
                    self.engine.cancel(t.rid)
                    del self._active[t.rid]
                if t.finish_reason is None:
                    self._finish(t, "cancelled")
            for t in admit:
                try:
                    t.rid = self.engine.add(t.prompt_ids, t.params)
                except Exception as e:
                    t.finish_reason = "error"
                    self._emit(t, "error", str(e))
                    continue
                t.t_admit = time.perf_counter()
                self._active[t.rid] = t
            if not self._active:
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # the engine's state is unknown now: fail the batch, keep serving
                progress.warn(f"serve: engine step failed for {self.name}: {e!r}")
                for rid, t in list(self._active.items()):
                    try:
                        self.engine.cancel(rid)
                    except Exception:
                        pass
                    t.finish_reason = "error"
                    self._emit(t, "error", f"generation failed: {e}")
                self._active.clear()
                continue
            now = time.perf_counter()
            for d in deltas:
                t = self._active.get(d.rid)
                if t is None:
                    continue
                if t.t_first is None:
                    t.t_first = now
                t.completion_tokens += len(d.token_ids)
                self._emit(t, "delta", d)
                if d.finish_reason is not None:
                    del self._active[d.rid]
                    self._finish(t, d.finish_reason)
        for t in pending:
            if t.rid is not None:
                try:
                    self.engine.cancel(t.rid)
                except Exception:
                    pass
            t.finish_reason = "error"
            self._emit(t, "error", "the model was unloaded")
