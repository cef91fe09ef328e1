"""Many `streamsink run` processes sharing one stream through leases, against the simulated stream over HTTP (its
call log names the worker behind every GetRecords) with moto behind it for the checkpoint table and the sinks.

Leases here are quick (failover 6 s, heartbeat 0.5 s, a pass every 2 s) so that failover fits in a test.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import Checkpoint, CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import SimulatedStream, StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from tests.conftest import read_archive, unique, wait_until
from tests.test_crash_safety import STREAMSINK, write_config

FAILOVER, HEARTBEAT, PASS = 6.0, 0.5, 2.0  # failover well past any heartbeat delay of a loaded CI machine
WATCH = 0.25
"""Seconds between the test's reads of the lease rows: each is a Query of the whole partition on the moto server the
workers use: read every 50 ms (the default) they add load beside the workers' own passes on a loaded machine."""

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("workers")]  # one after another: fewer processes at once


class Worker:
    """One `streamsink run` process with a fixed worker id; its log goes to a file."""

    def __init__(self, config: Path, worker_id: str, logs: Path, *options: str) -> None:
        self.id = worker_id
        self.log = logs / f"{worker_id}.log"
        self._log_file = self.log.open("wb")
        env = {**os.environ, "STREAMSINK_LEASE__WORKER_ID": worker_id}
        self.process = subprocess.Popen(
            [*STREAMSINK, "run", "--config", str(config), *options],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> float:
        self.process.send_signal(signum)
        return time.monotonic()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        self._log_file.close()
        return code


class Fleet:
    """The stream, its server, the config every worker shares, and the workers started so far."""

    def __init__(
        self,
        aws: EmbeddedAws,
        tmp_path: Path,
        stream: SimulatedStream,
        server: SimulatedStreamsServer,
        sinks: list[dict[str, Any]],
    ) -> None:
        self.aws, self.tmp_path, self.stream, self.server = aws, tmp_path, stream, server
        self.checkpoint_table = unique("checkpoints")
        self.config = write_config(
            tmp_path / "worker.toml",
            {
                "source": {"stream_arn": stream.arn, "region": aws.region, "endpoint_url": server.endpoint_url},
                "checkpoint": {"table_name": self.checkpoint_table},
                "lease": {"failover_seconds": FAILOVER, "heartbeat_seconds": HEARTBEAT, "pass_interval_seconds": PASS},
                "batch": {"max_records": 200, "max_wait_seconds": 0.1},
                "reader": {
                    "idle_poll_min_seconds": 0.05,
                    "idle_poll_max_seconds": 0.3,
                    "discovery_interval_seconds": 1.0,
                },
                "runtime": {"log_format": "text", "shutdown_timeout_seconds": 15},
                "dead_letter": {"path": str(tmp_path / "dead-letters.jsonl")},
                "sinks": sinks,
            },
        )
        self.workers: list[Worker] = []

    def start(self, worker_id: str, *options: str) -> Worker:
        worker = Worker(self.config, worker_id, self.tmp_path, *options)
        self.workers.append(worker)
        return worker

    def rows(self) -> dict[str, Checkpoint]:
        store = CheckpointStore(
            self.aws.client("dynamodb"),
            table_name=self.checkpoint_table,
            stream_arn=self.stream.arn,
            consumer_name="streamsink",
            retry=RetryPolicy(RetrySettings()),
        )
        try:
            return store.load()
        except Exception:
            return {}  # the table is not created yet

    def held(self) -> dict[str, list[str]]:
        """Unfinished shards by owner, from the lease rows."""
        owners: dict[str, list[str]] = collections.defaultdict(list)
        for shard_id, row in self.rows().items():
            if row.owner is not None and not row.finished:
                owners[row.owner].append(shard_id)
        return dict(owners)

    def stop_all(self) -> list[int | None]:
        return [w.stop() for w in self.workers if w.process.returncode is None]


@pytest.fixture
def fleet(aws: EmbeddedAws, tmp_path: Path, bucket: str) -> Iterator[Callable[..., Fleet]]:
    made: list[tuple[Fleet, SimulatedStreamsServer]] = []

    def make(stream: SimulatedStream, simulator: StreamSimulator, sinks: list[dict[str, Any]] | None = None) -> Fleet:
        server = SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url).start()
        archive = {
            "type": "s3_parquet",
            "bucket": bucket,
            "prefix": "orders/",
            "endpoint_url": aws.endpoint_url,
            "buffer_max_seconds": 0.5,
        }
        built = Fleet(aws, tmp_path, stream, server, sinks or [archive])
        made.append((built, server))
        return built

    yield make
    for built, server in made:
        built.stop_all()
        server.stop()


def worker_of(agent: str | None) -> str | None:
    """The worker id in a streamsink User-Agent ("streamsink/1.2 worker/<id> ...")."""
    for part in (agent or "").split():
        if part.startswith("worker/"):
            return part.removeprefix("worker/")
    return None


def readers_by_shard(simulator: StreamSimulator, before: float) -> dict[str, list[str]]:
    """Per shard, the workers that read it before `before`, in the order of their runs of GetRecords calls (A, B:
    a handoff)."""
    runs: dict[str, list[str]] = collections.defaultdict(list)
    for call in simulator.calls("GetRecords"):
        if call.at >= before:
            continue
        worker = worker_of(call.client)
        if call.shard_id is None or worker is None:
            continue
        if not runs[call.shard_id] or runs[call.shard_id][-1] != worker:
            runs[call.shard_id].append(worker)
    return dict(runs)


def first_reads(simulator: StreamSimulator, since: float, shards: list[str], not_by: str) -> dict[str, float]:
    """Per shard, seconds from `since` to its first GetRecords by a worker other than `not_by`."""
    firsts: dict[str, float] = {}
    for call in simulator.calls("GetRecords"):
        if call.at > since and call.shard_id in shards and worker_of(call.client) != not_by:
            firsts.setdefault(call.shard_id or "", call.at - since)
    return firsts


def archived_ids(aws: EmbeddedAws, bucket: str) -> collections.Counter[str]:
    return collections.Counter(read_archive(aws, bucket).column("event_id").to_pylist())


def test_three_workers_share_32_shards_evenly_and_no_shard_is_read_by_two_at_once(
    aws: EmbeddedAws, bucket: str, fleet: Callable[..., Fleet]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=32)
    stream.write_synthetic(640, item_bytes=200)
    running = fleet(stream, simulator)
    for n in range(3):
        running.start(f"w{n}")
    wait_until(lambda: all("lease(s) of" in w.output() for w in running.workers), timeout=60, what="all started")
    joined = time.monotonic()
    wait_until(
        lambda: sorted(len(s) for s in running.held().values()) == [10, 11, 11],
        timeout=2 * PASS + FAILOVER + 2,
        what="10-11 shards each within two passes",
        interval=WATCH,
    )
    balanced = time.monotonic() - joined
    stream.write_synthetic(640, item_bytes=200, first=640)
    every = {r["eventID"] for r in stream.records()}
    wait_until(lambda: set(archived_ids(aws, bucket)) >= every, timeout=60, what="every change archived")
    stopping = time.monotonic()  # from here on the first to stop hands its shards to those still running
    assert running.stop_all() == [0, 0, 0]

    readers = readers_by_shard(simulator, before=stopping)
    assert set(readers) == set(stream.open_shard_ids())
    for shard_id, workers in readers.items():
        # A shard handed on is read by one worker after the other, never by two in turn again.
        assert len(workers) == len(set(workers)), (shard_id, workers)
    print(f"balanced {balanced:.1f}s after the last worker joined")


def test_a_killed_workers_shards_are_taken_within_failover_and_only_its_unchecked_span_repeats(
    aws: EmbeddedAws, bucket: str, fleet: Callable[..., Fleet]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=8)
    running = fleet(stream, simulator)
    survivor, victim = running.start("survivor"), running.start("victim")
    wait_until(
        lambda: sorted(len(s) for s in running.held().values()) == [4, 4], timeout=60, what="4 each", interval=WATCH
    )
    writing = threading.Event()

    def write() -> None:
        n = 0
        while not writing.is_set():
            stream.write_synthetic(40, item_bytes=200, first=n)
            n += 40
            time.sleep(0.1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(2.0)
        orphans = running.held()["victim"]
        killed_at = time.monotonic()
        victim.process.kill()  # not reaped: a zombie looks alive to a same-host check, so the failover time applies
        at_kill = {s: running.rows()[s].sequence_number for s in orphans}
        wait_until(
            lambda: sorted(running.held().get("survivor", [])) == sorted(stream.open_shard_ids()),
            timeout=FAILOVER + PASS + 5,
            what="every orphan taken",
            interval=WATCH,
        )
        time.sleep(1.0)
    finally:
        writing.set()
        writer.join()
    every = {r["eventID"]: r for r in stream.records()}
    wait_until(lambda: set(archived_ids(aws, bucket)) >= set(every), timeout=60, what="every change archived")
    victim.process.wait()
    assert survivor.stop() == 0

    firsts = {}
    for call in simulator.calls("GetRecords"):
        if call.shard_id in orphans and call.at > killed_at and worker_of(call.client) == "survivor":
            firsts.setdefault(call.shard_id, call.at - killed_at)
    assert set(firsts) == set(orphans)
    assert max(firsts.values()) < FAILOVER + PASS + 2.0, firsts  # slack for a loaded machine
    print("failover seconds per orphan:", sorted(round(v, 2) for v in firsts.values()))
    counts = archived_ids(aws, bucket)
    table = read_archive(aws, bucket)
    where = dict(
        zip(
            table.column("event_id").to_pylist(),
            zip(table.column("shard_id").to_pylist(), table.column("sequence_number").to_pylist(), strict=True),
            strict=True,
        )
    )
    for event_id, count in counts.items():
        if count > 1:  # a duplicate: only what the killed worker read past its last checkpoint
            shard_id, sequence = where[event_id]
            assert shard_id in orphans, (event_id, shard_id)
            assert at_kill[shard_id] is None or int(sequence) > int(at_kill[shard_id] or 0)


def test_a_paused_worker_cannot_move_a_checkpoint_it_lost_and_the_replica_ends_equal(
    aws: EmbeddedAws, replica: str, fleet: Callable[..., Fleet]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=4, key_schema=[("pk", "HASH"), ("sk", "RANGE")])
    sinks = [{"type": "dynamodb_table", "table_name": replica, "endpoint_url": aws.endpoint_url}]
    running = fleet(stream, simulator, sinks)
    running.start("awake")
    paused = running.start("paused")
    wait_until(
        lambda: sorted(len(s) for s in running.held().values()) == [2, 2], timeout=60, what="2 each", interval=WATCH
    )
    positions: dict[str, list[int]] = collections.defaultdict(list)
    sampling = threading.Event()

    def sample() -> None:  # every checkpoint as it moves: none may ever go back
        while not sampling.is_set():
            for shard_id, row in running.rows().items():
                if row.sequence_number and (
                    not positions[shard_id] or positions[shard_id][-1] != int(row.sequence_number)
                ):
                    positions[shard_id].append(int(row.sequence_number))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    keys = [f"k{n}" for n in range(30)]

    def churn(rounds: int, start: int) -> None:
        for n in range(start, start + rounds):
            key = keys[n % len(keys)]
            if n % 7 == 3:
                stream.delete_item({"pk": {"S": key}, "sk": {"S": "a"}})
            else:
                stream.put_item({"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(n)}})

    try:
        churn(60, 0)
        paused.signal(signal.SIGSTOP)
        # What it holds once stopped: read before the signal, a take it was making then (the balance still
        # settling under a loaded machine) would be missing from the list. A write it had sent lands first.
        time.sleep(0.5)
        lost = running.held()["paused"]
        churn(60, 60)  # while it sleeps: its shards' changes wait for a new owner
        wait_until(
            lambda: sorted(running.held().get("awake", [])) == sorted(stream.open_shard_ids()),
            timeout=FAILOVER + PASS + 5,
            what="the paused worker's shards taken",
            interval=WATCH,
        )
        churn(60, 120)
        paused.signal(signal.SIGCONT)
        churn(60, 180)
        wait_until(
            lambda: "lease of shard" in paused.output() and "lost" in paused.output(),
            timeout=30,
            what="the paused worker to notice",
        )
        expected = {(i["pk"]["S"], i["sk"]["S"]): i for i in stream.items()}

        def replicated() -> dict[tuple[str, str], Any]:
            items = aws.client("dynamodb").scan(TableName=replica, ConsistentRead=True)["Items"]
            kept = ({k: v for k, v in i.items() if k != "_streamsink_sequence"} for i in items)
            return {(i["pk"]["S"], i["sk"]["S"]): i for i in kept}

        wait_until(lambda: replicated() == expected, timeout=60, what="the replica to equal the source")
    finally:
        sampling.set()
        sampler.join()
    assert running.stop_all() == [0, 0]
    losses = [line for line in paused.output().splitlines() if "lease of shard" in line and " lost " in line]
    assert losses and all(any(s in line for s in lost) for line in losses), losses  # only what it held when paused
    for shard_id, seen in positions.items():
        assert seen == sorted(seen), (shard_id, seen)  # no checkpoint moved back


def test_rolling_restarts_hand_every_shard_on_within_seconds_and_lose_nothing(
    aws: EmbeddedAws, bucket: str, fleet: Callable[..., Fleet]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=4)
    running = fleet(stream, simulator)
    current = [running.start("r0"), running.start("r1")]
    wait_until(
        lambda: sorted(len(s) for s in running.held().values()) == [2, 2], timeout=60, what="2 each", interval=WATCH
    )
    writing = threading.Event()

    def write() -> None:
        n = 0
        while not writing.is_set():
            stream.write_synthetic(20, item_bytes=200, first=n)
            n += 20
            time.sleep(0.1)

    writer = threading.Thread(target=write)
    writer.start()
    handoffs: list[float] = []
    try:
        for cycle in range(5):
            if cycle == 2:
                stream.split_shard()
            leaving = current.pop(0)
            given_up = running.held().get(leaving.id, [])
            stopped_at = leaving.signal(signal.SIGTERM)
            assert leaving.stop() == 0, leaving.output()
            current.append(running.start(f"r{cycle + 2}"))

            # A parent the split closed may be finished by the leaving worker: it has nothing to hand on.
            open_ones = [s for s in given_up if not running.rows()[s].finished]
            wait_until(
                lambda: set(first_reads(simulator, stopped_at, open_ones, leaving.id)) == set(open_ones),  # noqa: B023
                timeout=10,
                what=f"cycle {cycle}: the shards handed on",
            )
            firsts = first_reads(simulator, stopped_at, open_ones, leaving.id)
            handoffs.extend(firsts.values())
            wait_until(lambda: "lease(s) of" in current[-1].output(), timeout=60, what="the new worker started")
    finally:
        writing.set()
        writer.join()
    every = {r["eventID"] for r in stream.records()}
    wait_until(lambda: set(archived_ids(aws, bucket)) >= every, timeout=60, what="every change archived")
    assert running.stop_all() == [0, 0]
    print("handoff seconds:", sorted(round(h, 2) for h in handoffs))
    assert handoffs and max(handoffs) < 5.0


def test_run_with_workers_starts_that_many_sharing_the_shards_and_a_sigterm_drains_them_all(
    aws: EmbeddedAws, bucket: str, fleet: Callable[..., Fleet]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=6)
    stream.write_synthetic(300, item_bytes=200)
    running = fleet(stream, simulator)
    group = running.start("group", "--workers", "2")
    wait_until(
        lambda: sorted((w, len(s)) for w, s in running.held().items()) == [("group-0", 3), ("group-1", 3)],
        timeout=60,
        what="two workers with 3 shards each",
        interval=WATCH,
    )
    every = {r["eventID"] for r in stream.records()}
    wait_until(lambda: set(archived_ids(aws, bucket)) >= every, timeout=60, what="every change archived")
    assert {worker_of(c.client) for c in simulator.calls("GetRecords")} == {"group-0", "group-1"}
    shown = subprocess.run(
        [*STREAMSINK, "status", "--config", str(running.config), "--json"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert sorted((w["worker"], w["leases_held"]) for w in document["workers"]) == [("group-0", 3), ("group-1", 3)]
    assert all(0 <= w["heartbeat_age_seconds"] < 30 for w in document["workers"])
    assert sorted(s["owner"] for s in document["shards"]) == ["group-0"] * 3 + ["group-1"] * 3

    assert group.stop() == 0, group.output()
    assert running.held() == {}  # both drained and released their leases
    assert group.output().count("stopped: ") == 2, group.output()
