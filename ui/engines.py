"""Engines shared by every browser session, and engine work run off the event loop.

* `EngineRegistry`: one `BeaconEngine` per model name for the whole process, loaded once (in a
  background thread) and shared by all sessions; the most recently used few stay loaded.
* `thread_events`: run blocking work (document extraction, condensing, an `AnswerStream`) in a
  thread and receive what it reports in async code. A `CancelToken` stops it: streams it
  watches are cancelled (`AnswerStream.cancel()`: the engine stops at its next window or token
  and frees itself); work without a stream (reading files, `engine.condense`) checks the token
  in its progress callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str], Any]  # model name -> BeaconEngine
RETRY_FAILED_AFTER_S = 10.0


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is for the user (what to do about it)."""


@dataclass
class _Slot:
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    engine: Any = None
    error: str | None = None
    failed_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    pinned: bool = False


class EngineRegistry:
    """Engines by model name, shared process-wide; at most `max_models` kept loaded (LRU)."""

    def __init__(self, factory: EngineFactory, *, max_models: int = 2) -> None:
        self._factory = factory
        self.max_models = max(1, max_models)
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def add(self, name: str, engine: Any) -> None:
        """Register an already loaded engine under `name` (never evicted)."""
        slot = _Slot(name, engine=engine, pinned=True)
        slot.done.set()
        with self._lock:
            self._slots[name] = slot

    def start(self, name: str, *, retry: bool = False) -> _Slot:
        """Begin loading `name` in the background unless it is loaded or loading."""
        with self._lock:
            slot = self._slots.get(name)
            stale = (
                slot is not None
                and slot.error is not None
                and (retry or time.monotonic() - slot.failed_at > RETRY_FAILED_AFTER_S)
            )
            if slot is not None and not stale:
                self._slots.move_to_end(name)
                return slot
            slot = _Slot(name)
            self._slots[name] = slot
            self._evict()
        threading.Thread(target=self._load, args=(slot,), name=f"load {name}", daemon=True).start()
        return slot

    def _evict(self) -> None:
        ready = [s for s in self._slots.values() if s.done.is_set() and not s.pinned]
        loaded = sum(1 for s in self._slots.values() if s.engine is not None or not s.done.is_set())
        for slot in ready:  # oldest first
            if loaded <= self.max_models:
                break
            del self._slots[slot.name]
            if slot.engine is not None:
                loaded -= 1
                logger.info("unloading model %s", slot.name)

    def _load(self, slot: _Slot) -> None:
        started = time.perf_counter()
        try:
            slot.engine = self._factory(slot.name)
        except Exception as error:  # shown in the page; the app keeps running
            slot.error = _load_message(slot.name, error)
            slot.failed_at = time.monotonic()
            logger.warning("could not load %s: %s", slot.name, slot.error)
        finally:
            slot.seconds = time.perf_counter() - started
            slot.done.set()

    def get(self, name: str, *, retry: bool = False) -> Any:
        """The engine for `name`, loading it first if needed (blocks)."""
        slot = self.start(name, retry=retry)
        slot.done.wait()
        if slot.error is not None:
            raise ModelLoadError(slot.error)
        return slot.engine

    async def aget(self, name: str, *, retry: bool = False) -> Any:
        """`get` for async code: waits without holding a thread."""
        slot = self.start(name, retry=retry)
        while not slot.done.is_set():
            await asyncio.sleep(0.1)
        if slot.error is not None:
            raise ModelLoadError(slot.error)
        return slot.engine

    def state(self, name: str) -> tuple[str, str]:
        """("ready" | "loading" | "failed" | "absent", detail) without loading anything."""
        with self._lock:
            slot = self._slots.get(name)
        if slot is None:
            return "absent", ""
        if not slot.done.is_set():
            return "loading", f"{time.monotonic() - slot.started_at:.0f} s"
        if slot.error is not None:
            return "failed", slot.error
        return "ready", "" if slot.pinned else f"{slot.seconds:.1f} s"


def _load_message(name: str, error: Exception) -> str:
    from beacon_apps.beacon import BeaconConfigError, CheckpointError

    if isinstance(error, (CheckpointError, BeaconConfigError)):
        return str(error)
    if isinstance(error, OSError | ValueError):
        return f"{name}: {error}"
    return f"{name}: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------- per-request ratio
def ratio_choices(engine: Any) -> list[int]:
    return sorted(int(r) for r in engine.beacon_config.beacon_ratio)


def parse_ratio(engine: Any, ratio: str | int | None) -> str | int:
    """'auto' or one of the model's trained ratios; ValueError (user-facing) otherwise."""
    if ratio in (None, "", "auto"):
        return "auto"
    try:
        value = int(str(ratio).strip().lstrip("x×"))
    except ValueError:
        raise ValueError(f"ratio: expected 'auto' or a number, got {ratio!r}") from None
    choices = ratio_choices(engine)
    if value not in choices:
        raise ValueError(
            f"ratio: {value} is not one of this model's ratios ({', '.join(map(str, choices))})"
        )
    return value


# ---------------------------------------------------------------------- work in a thread
class Cancelled(Exception):
    """Raised by `CancelToken.check` in work that has no stream to cancel (reading files)."""


class CancelToken:
    """Stops one request: set by the Stop button, or when the event consuming it goes away."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._streams: list[Any] = []

    def watch(self, stream: Any) -> Any:
        """Cancel `stream` (an `AnswerStream`) with this token; returns it."""
        with self._lock:
            self._streams.append(stream)
        if self.cancelled:
            stream.cancel()
        return stream

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            streams = list(self._streams)
        for stream in streams:
            stream.cancel()  # thread-safe: the engine stops at its next window or token

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


_DONE = object()


@dataclass
class _Failure:
    error: BaseException


async def thread_events(
    work: Callable[[Callable[[Any], None]], None], token: CancelToken
) -> AsyncIterator[Any]:
    """Run `work(emit)` in a daemon thread; yield what it emits here, in order, in batches.

    Each batch is the list of items emitted since the last one was taken (one item when the
    consumer keeps up, more when the work is faster than the page).

    An exception in the work is re-raised here; `Cancelled` (from `token.check()`) ends the
    iteration quietly. If the consumer goes away (the event was cancelled, the client left),
    the token is cancelled, which cancels the streams it watches.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def post(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(post)
        except Cancelled:
            pass
        except BaseException as error:
            post(_Failure(error))
        finally:
            post(_DONE)

    threading.Thread(target=run, name="beacon-app work", daemon=True).start()
    try:
        finished = False
        while not finished:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if _DONE in batch:
                finished = True
                batch = batch[: batch.index(_DONE)]
            failures = [item for item in batch if isinstance(item, _Failure)]
            batch = [item for item in batch if not isinstance(item, _Failure)]
            if batch:
                yield batch
            if failures:
                raise failures[0].error
    finally:
        token.cancel()  # a no-op when the work is finished; stops it otherwise


def iterate_stream(stream: Any, emit: Callable[[Any], None]) -> Any:
    """Emit ("delta", text) for each piece of `stream`; return its `Answer` (finish_reason
    "cancelled" when its token was cancelled). Closes the stream on exit."""
    try:
        for delta in stream:
            emit(("delta", delta))
        return stream.answer
    finally:
        stream.close()
