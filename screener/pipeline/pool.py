"""A pool of isolated worker processes for untrusted work (decoding received images).

Each worker is a fresh interpreter (``spawn``: no state, locks or threads inherited
from the node) that:

- limits its own address space (``RLIMIT_AS`` = ``memory_limit_mb``): a decoder that
  tries to allocate gigabytes gets ``MemoryError`` (or dies) inside the worker;
- runs single-threaded numerical libraries (the parallelism is the pool's);
- exits when its pipe closes, and a watchdog thread ends it within a second of the
  parent's death even in the middle of a decode (no orphans).

``WorkerPool.map(fn, items)`` runs ``fn(item)`` for every item and yields
``(index, result)`` as results arrive; ``result`` is a ``Failure`` when the worker
raised, died (SIGABRT/SIGSEGV inside a C decoder, killed for memory) or overran
``timeout_s``. A dead or overrunning worker is replaced and the other items go on.
Failure reasons are the pool's own words: no exception text (it can quote header
values) crosses into them.

``close()`` (or leaving the ``with`` block) stops every worker and waits for it; no
process outlives the pool. One ``map`` at a time per pool (a lock serialises callers).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

# Single-threaded numerical libraries in the workers: the pool is the parallelism, and thread
# pools reserve address space that would count against RLIMIT_AS.
_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1",
    "MALLOC_ARENA_MAX": "2",
}
_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class Failure:
    """Why an item produced no result (the pool's words; no header values).

    `kind`: "error" (the task raised), "memory" (MemoryError under the limit), "died" (the
    worker ended: a signal, e.g. a decoder's SIGABRT/SIGSEGV, or killed), "timeout"."""

    reason: str
    kind: str = "error"


def _die_with_parent(parent_pid: int) -> None:
    """End this worker within a second once its parent process is gone.

    (PR_SET_PDEATHSIG would fire when the parent *thread* that started the worker ends,
    and the pool starts replacement workers from whichever thread is running it.)"""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _limit_memory(memory_limit_mb: int) -> None:
    if memory_limit_mb <= 0:
        return
    import resource

    limit = int(memory_limit_mb) * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(
    conn: Connection, memory_limit_mb: int, parent_pid: int, preload: tuple[str, ...] = (), nice: int = 0
) -> None:
    """The worker loop: receive (fn, item), send ("ok", result) or ("err", reason)."""
    _die_with_parent(parent_pid)
    if nice > 0:  # below the node's own threads: receiving images keeps its CPU
        with contextlib.suppress(OSError):
            os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    with contextlib.suppress(Exception):
        import cv2

        cv2.setNumThreads(1)
    import importlib

    for name in preload:  # imports before "ready": they do not count against an item's time
        importlib.import_module(name)
    _limit_memory(memory_limit_mb)
    conn.send(("ready", None))  # time limits count from here, not from the interpreter's start
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:  # the pool is closing: nothing to flush (results went back on the pipe)
            os._exit(0)
        fn, item = msg
        try:
            reply: tuple[str, Any] = ("ok", fn(item))
        except MemoryError:
            reply = ("mem", "out of memory: the image needs more than the decode worker's memory limit")
        except BaseException as exc:  # noqa: BLE001 - any error fails this item only
            reply = ("err", f"decoding raised an unexpected error ({exc.__class__.__name__})")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("mem", "out of memory: the result is larger than the decode worker's memory limit"))
        except (BrokenPipeError, EOFError, OSError):
            return
        del reply, msg, fn, item


def death_reason(exitcode: int | None) -> str:
    """Our words for a worker that ended while working on an item."""
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGSEGV:
            return "the decoder crashed (segmentation fault) on this image"
        if sig == signal.SIGABRT:
            return "the decoder aborted on this image"
        if sig == signal.SIGKILL:
            return "the decode worker was killed (out of memory?) on this image"
        if sig == signal.SIGBUS:
            return "the decoder crashed (bus error) on this image"
        return f"the decode worker ended by signal {sig} on this image"
    return f"the decode worker exited unexpectedly (code {exitcode}) on this image"


class _Worker:
    def __init__(self, ctx: Any, memory_limit_mb: int, preload: tuple[str, ...], nice: int = 0) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.conn: Connection = parent
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, memory_limit_mb, os.getpid(), preload, nice),
            daemon=True,
            name="screener-decode",
        )
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in _CHILD_ENV}
            os.environ.update(_CHILD_ENV)
            try:
                self.proc.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        child.close()
        self.task: int | None = None
        self.deadline = 0.0
        self.ready = False

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Block until the worker has started (imports done, limits set)."""
        if self.ready:
            return True
        try:
            if self.conn.poll(timeout):
                self.ready = self.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            self.ready = False
        return self.ready

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.proc.close()


class WorkerPool:
    """``workers`` isolated processes; see the module doc."""

    def __init__(
        self,
        workers: int,
        memory_limit_mb: int = 0,
        timeout_s: float = 60.0,
        start_method: str = "spawn",
        preload: tuple[str, ...] = (),
        nice: int = 0,
    ) -> None:
        """`preload`: modules each worker imports before it takes work (the task's module);
        `nice`: the workers' niceness (0 keeps the parent's priority)."""
        if workers < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = int(workers)
        self.memory_limit_mb = int(memory_limit_mb)
        self.timeout_s = float(timeout_s)
        self.preload = tuple(preload)
        self.nice = max(0, int(nice))
        self._ctx = mp.get_context(start_method)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = [self._spawn() for _ in range(self.size)]
        for w in self._workers:  # started side by side, then waited for
            w.wait_ready()
        self._closed = False
        self.replaced = 0  # workers replaced after a death or an overrun (for metrics and tests)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.memory_limit_mb, self.preload, self.nice)

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (ask, then kill after `timeout`) and wait for each."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                with contextlib.suppress(Exception):
                    w.conn.send(None)
            end = time.monotonic() + timeout
            for w in self._workers:
                w.proc.join(max(0.0, end - time.monotonic()))
                if w.proc.is_alive():
                    w.kill()
                with contextlib.suppress(Exception):
                    w.conn.close()
            self._workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        new = self._spawn()
        self._workers[self._workers.index(w)] = new
        self.replaced += 1
        new.wait_ready()

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """Run ``fn(item)`` in the workers; yield ``(index, result or Failure)`` as they finish.

        `fn` must be importable by name (a module-level function). Every index is yielded
        exactly once, whatever happens to the workers.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            yield from self._map(fn, items)

    def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        source = iter(enumerate(items))  # pulled lazily: a worker gets the next item when it is free
        todo: deque[tuple[int, Any, int]] = deque()  # items to try again (their worker died idle)
        busy: dict[int, tuple[_Worker, Any, int]] = {}  # index -> (worker, item, tries)
        exhausted = False

        def take() -> tuple[int, Any, int] | None:
            nonlocal exhausted
            if todo:
                return todo.popleft()
            if exhausted:
                return None
            nxt = next(source, None)
            if nxt is None:
                exhausted = True
                return None
            return nxt[0], nxt[1], 0

        try:
            while True:
                for w in self._workers:
                    if w.task is not None:
                        continue
                    got = take()
                    if got is None:
                        break
                    idx, item, tries = got
                    try:
                        if not w.wait_ready():
                            raise BrokenPipeError("worker did not start")
                        w.conn.send((fn, item))
                    except (BrokenPipeError, EOFError, OSError):
                        # The worker died while idle: replace it and try this item again (once).
                        self._replace(w)
                        if tries == 0:
                            todo.appendleft((idx, item, 1))
                        else:
                            yield idx, Failure("the decode worker could not be started for this image", "died")
                        break
                    w.task, w.deadline = idx, time.monotonic() + self.timeout_s
                    busy[idx] = (w, item, tries)
                if not busy:
                    if todo or not exhausted:
                        continue
                    return
                running = [w for w in self._workers if w.task is not None]
                timeout = max(0.0, min(w.deadline for w in running) - time.monotonic())
                ready = wait([w.conn for w in running] + [w.proc.sentinel for w in running], timeout)
                now = time.monotonic()
                for w in running:
                    task_idx = w.task
                    assert task_idx is not None
                    result: Any = None
                    done = False
                    if w.conn in ready or w.proc.sentinel in ready:
                        try:
                            if w.conn.poll():
                                status, value = w.conn.recv()
                                kind = {"err": "error", "mem": "memory"}.get(status, "error")
                                result = value if status == "ok" else Failure(value, kind)
                                done = True
                        except (EOFError, OSError):
                            pass
                        if not done and (w.proc.sentinel in ready or not w.proc.is_alive()):
                            w.proc.join(1)
                            result, done = Failure(death_reason(w.proc.exitcode), "died"), True
                            self._replace(w)
                    elif now >= w.deadline:
                        result, done = Failure(f"decoding took longer than {self.timeout_s:g} s", "timeout"), True
                        self._replace(w)
                    if done:
                        w.task = None
                        del busy[task_idx]
                        yield task_idx, result
        finally:
            # The caller stopped early (or an error): workers still busy hold stale work.
            for w, _item, _tries in list(busy.values()):
                if w in self._workers:
                    self._replace(w)
            for w in self._workers:
                w.task = None
