"""Which shards this worker reads: leases shared by every worker of one consumer, in the checkpoint table.

The protocol is KCL 2.x's, with liveness kept per worker instead of per lease. KCL renews every lease it holds
every few seconds (18 writes per shard per minute); here each worker moves one heartbeat counter on, so a
thousand shards on two workers cost two heartbeats, not a thousand renewals. A lease is expired when its owner's
heartbeat has not moved on for `failover_seconds`, as this worker's monotonic clock measures it from the first
time it saw that value: no clocks are compared across machines. A worker on the same host whose process is
gone (same host, boot and process namespace, its pid not running) is expired at once, so a restart after a crash
does not wait out the failover time (a restarted container is another namespace: it waits).

A pass looks at every row and decides, towards an even share (`ceil(readable shards / live workers)`):
- take: shards nobody holds or whose owner expired, up to the share;
- steal: only when nothing is free and this worker is below its share, one shard per pass from the most loaded
  worker, once it has stayed above its share for a pass interval without giving any up;
- shed: shards held above the share, given up gracefully (drained and checkpointed first, then released), so a
  worker that joins gets its share within a heartbeat or two instead of one steal per pass.
Fencing is not here: it is the condition on every checkpoint write (`CheckpointStore.save`).
"""

from __future__ import annotations

import collections
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline.state.checkpoint import Checkpoint, StoredState, WorkerBeat


def default_worker_id() -> str:
    """Host name, process id and a random suffix: two processes are never one worker, even across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def local_identity() -> str | None:
    """Host name, boot and process namespace: within one identity a pid names one process, so a worker can tell
    that a peer's process is gone. None where Linux's /proc does not say (the failover time applies)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            boot_id = boot.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot_id}/{namespace}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What one pass decided; the runner carries it out (takes need the store, sheds need a drain first)."""

    take: list[Checkpoint] = field(default_factory=list)
    steal: Checkpoint | None = None
    shed: list[str] = field(default_factory=list)
    share: int = 0
    live_workers: int = 1


class LeaseCoordinator:
    def __init__(
        self,
        worker_id: str,
        *,
        failover_seconds: float,
        steal_after_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        identity: str | None = None,
        process_gone: Callable[[int], bool] = _process_gone,
    ) -> None:
        self.worker_id = worker_id
        self.identity = identity
        self._failover = failover_seconds
        self._steal_after = steal_after_seconds
        self._above_since: dict[str, float] = {}
        """Peers above their share without giving any up, and since when (this clock)."""
        self._clock = clock
        self._process_gone = process_gone
        self._seen: dict[str, tuple[int, float]] = {}
        """Per worker: the heartbeat value last seen and when (this clock) it was first seen with that value."""
        self._absent: dict[str, float] = {}
        """Owners named by rows that have no heartbeat row, and since when (this clock) that is so."""
        self._workers: dict[str, WorkerBeat] = {}
        self._last_live: list[str] = [worker_id]
        self._previous_load: collections.Counter[str] = collections.Counter()
        """Leases per peer at the last pass: a peer holding fewer than then is giving leases up."""
        self.last_changes: int | None = None
        self._lock = threading.RLock()  # heartbeats (their own thread) and passes both observe

    def observe(self, workers: dict[str, WorkerBeat], at: float | None = None) -> bool:
        """Take in the heartbeat rows, read at `at` (this clock, before the read was sent; default now); True if
        the set of live workers changed since the last look (a pass should follow): one joined or left, or one
        expired meanwhile (its heartbeat stood still, or its process is gone).

        Judging by when the read was sent, not when it is used, keeps a pause between the two (a slow answer, a
        VM or GC pause) from making live peers look expired: their heartbeats may have moved on meanwhile."""
        with self._lock:
            return self._observe(workers, at)

    def _observe(self, workers: dict[str, WorkerBeat], at: float | None) -> bool:
        before = self._last_live
        now = self._clock() if at is None else at
        for worker, beat in workers.items():
            seen = self._seen.get(worker)
            if seen is None or seen[0] != beat.beat:
                self._seen[worker] = (beat.beat, now)
            self._absent.pop(worker, None)
        for worker in set(self._seen) - set(workers):
            del self._seen[worker]
        self._workers = dict(workers)
        self._last_live = self.live_workers(now)
        return self._last_live != before

    def is_live(self, worker: str, at: float | None = None) -> bool:
        with self._lock:
            return self._is_live(worker, at)

    def _is_live(self, worker: str, at: float | None) -> bool:
        if worker == self.worker_id:
            return True
        now = self._clock() if at is None else at
        beat = self._workers.get(worker)
        if beat is None:
            first = self._absent.setdefault(worker, now)
            return now - first < self._failover
        if (
            self.identity is not None
            and beat.identity == self.identity
            and beat.pid is not None
            and self._process_gone(beat.pid)
        ):
            return False  # its process is gone from this host
        return now - self._seen[worker][1] < self._failover

    def live_beats(self, at: float | None = None) -> dict[str, WorkerBeat]:
        """The last heartbeat read of every live peer (this worker's own is not among them)."""
        with self._lock:
            return {w: b for w, b in self._workers.items() if w != self.worker_id and self._is_live(w, at)}

    def live_workers(self, at: float | None = None) -> list[str]:
        with self._lock:
            return sorted({w for w in self._workers if self._is_live(w, at)} | {self.worker_id})

    def plan(self, state: StoredState, readable: Iterable[str], at: float | None = None) -> LeasePlan:
        """Decide a pass from a read of every row sent at `at` (this clock) and the shards readable now."""
        with self._lock:
            return self._plan(state, list(readable), self._clock() if at is None else at)

    def _plan(self, state: StoredState, readable: list[str], at: float) -> LeasePlan:
        self._observe(state.workers, at)
        rows = state.checkpoints
        candidates = [s for s in readable if s in rows and not rows[s].finished]
        live = self.live_workers(at)
        if not candidates:
            return LeasePlan(live_workers=len(live))
        share = math.ceil(len(candidates) / len(live))
        mine = [s for s in candidates if rows[s].owner == self.worker_id]
        free = [rows[s] for s in candidates if rows[s].owner is None]
        expired = [
            rows[s]
            for s in candidates
            if rows[s].owner not in (None, self.worker_id) and not self.is_live(rows[s].owner or "", at)
        ]
        random.shuffle(free)  # workers passing at once mostly go for different shards
        random.shuffle(expired)
        take = (expired + free)[: max(0, share - len(mine))]
        steal = None
        load = collections.Counter(
            rows[s].owner or "" for s in candidates if rows[s].owner not in (None, self.worker_id)
        )
        for peer in load:  # leases a peer is draining to give up are on their way: not a peer stuck above its share
            load[peer] -= min(load[peer], state.workers[peer].shedding if peer in state.workers else 0)
        now = at
        for peer in list(self._above_since):
            if load.get(peer, 0) <= share or load[peer] < self._previous_load.get(peer, 0):
                del self._above_since[peer]  # at its share, or giving leases up
        for peer, held in load.items():
            if held > share and held >= self._previous_load.get(peer, 0):
                self._above_since.setdefault(peer, now)
        self._previous_load = load
        if not free and not expired and len(mine) < share and load:
            victim, held = load.most_common(1)[0]
            # Only a worker that stays above its share without giving leases up: one that sheds hands them over
            # drained and checkpointed, while a stolen shard is read by both until the victim notices.
            if held > share and now - self._above_since.get(victim, now) >= self._steal_after:
                steal = random.choice([rows[s] for s in candidates if rows[s].owner == victim])
        shed = sorted(mine)[share:] if len(mine) > share and len(live) > 1 else []
        return LeasePlan(take=take, steal=steal, shed=shed, share=share, live_workers=len(live))
