"""Lease faults, in one process: a restart under the same worker id, a lost answer to a take, shards given up
while a poll or a slow sink holds their records, a pause between reading the heartbeats and judging them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.aws import AwsClients
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from sinks.memory import MemorySink
from tests.conftest import GateSink, wait_until
from tests.test_workers import worker_of

LEASE = {
    "failover_seconds": 3.0,
    "heartbeat_seconds": 0.2,
    "pass_interval_seconds": 0.5,
}  # 3 s: room for a loaded machine


def _pipeline_factory(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], simulator: StreamSimulator, arn: str
) -> Callable[..., Pipeline]:
    def pipeline(worker: str, sink: MemorySink, **lease: Any) -> Pipeline:
        settings = make_settings(
            source={"table_name": None, "stream_arn": arn}, lease={"worker_id": worker, **LEASE, **lease}
        )
        clients = AwsClients(aws.region, aws.endpoint_url, agent=f"worker/{worker}")
        simulator.attach(clients.client("dynamodbstreams"))
        return Pipeline(settings, sinks=[sink], clients=clients)

    return pipeline


# A worker restarted after a crash under the same worker id (`lease.worker_id` set, or `--workers N` with it set)
# finds rows naming itself: it takes them again (the epoch moves on, fencing off its earlier life) and reads them.
def test_a_worker_restarted_after_a_crash_under_the_same_id_reads_its_shards_again(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    stream.put_item({"pk": {"S": "a"}, "sk": {"S": "1"}})
    first_life = MemorySink()
    crashed = pipeline("archive-1", first_life)
    crashed.start()
    wait_until(lambda: len(crashed._leased) == 2, what="the first life holds both shards")
    wait_until(lambda: len(first_life.records) == 1, what="the first change delivered")
    # The crash: the process is gone without a release (no stop(), its threads just never run again).
    crashed._stopping.set()
    crashed._hard_stop.set()
    crashed.scheduler.stop(timeout=2)
    time.sleep(0.5)

    stream.put_item({"pk": {"S": "b"}, "sk": {"S": "2"}})
    stream.put_item({"pk": {"S": "c"}, "sk": {"S": "3"}})
    second_life = MemorySink()
    restarted = started(pipeline("archive-1", second_life))
    time.sleep(LEASE["failover_seconds"] + 4 * LEASE["pass_interval_seconds"])
    assert restarted.store is not None
    owners = {s: row.owner for s, row in restarted.store.load().items()}
    assert set(owners.values()) == {"archive-1"}  # the table says it holds both
    # ... but it reads neither: no reader, nothing delivered.
    assert restarted.scheduler.active_shard_ids() == set(stream.open_shard_ids()), (
        restarted._leased,
        restarted.scheduler.active_shard_ids(),
    )
    assert len(second_life.records) >= 2


class _LostTakeAnswer:
    """The real DynamoDB client, except that the first lease take is applied and its answer lost, and the retries
    of it meet a table that is down (a short checkpoint-table outage straddling one take)."""

    def __init__(self, client: Any, failures: int) -> None:
        self._client = client
        self.failures = failures
        self.armed = True
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def update_item(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        def down() -> ClientError:
            return ClientError(
                {
                    "Error": {"Code": "InternalServerError", "Message": "down"},
                    "ResponseMetadata": {"HTTPStatusCode": 500},
                },
                "UpdateItem",
            )

        if kwargs.get("UpdateExpression", "").startswith("SET #o = :me, lease_epoch"):
            if self.armed:
                self.armed = False
                self.fired = True
                self._client.update_item(**kwargs)  # DynamoDB applied it...
                raise down()  # ...and the answer never arrived
            if self.fired and self.failures > 0:
                self.failures -= 1
                raise down()
        return self._client.update_item(**kwargs)


# A take whose write landed but whose answer was lost, its retries running out in a short checkpoint-table outage:
# the row names this worker though it did not learn so; the next pass takes it again and the shard is read.
def test_a_take_applied_but_unanswered_through_a_short_outage_is_read_once_the_table_is_back(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=1)
    stream.put_item({"pk": {"S": "a"}, "sk": {"S": "1"}})
    sink = MemorySink()
    worker = _pipeline_factory(aws, make_settings, simulator, stream.arn)("w", sink)
    settings = worker.settings
    key = ("dynamodb", settings.source.region, settings.source.endpoint_url)
    lossy = _LostTakeAnswer(worker.clients.client("dynamodb"), failures=settings.retry.max_attempts - 1)
    lossy.armed = False
    worker.clients._cache[key] = lossy
    started(worker)
    wait_until(lambda: len(sink.records) == 1, what="the parent's change delivered")
    lossy.armed = True  # the next take (of the child, by the lease thread) is applied and unanswered
    (child,) = [stream.roll_over_shard()]
    stream.put_item({"pk": {"S": "b"}, "sk": {"S": "2"}})
    wait_until(lambda: not lossy.armed, what="the child's take tried")
    time.sleep(LEASE["failover_seconds"] + 6 * LEASE["pass_interval_seconds"])  # the outage is long over
    assert worker.store is not None
    row = worker.store.load()[child]
    assert row.owner == "w"  # the table says this worker holds it
    assert len(sink.records) == 2, (worker._leased, worker.scheduler.active_shard_ids())


# A shard given up (a worker joins) while this worker's sink is down stays this worker's until what it read of it
# is delivered and checkpointed, however long that takes: no span is read and delivered by both workers.
def test_a_shard_given_up_while_a_sink_is_slow_is_not_read_by_the_joiner_until_it_is_delivered(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    slow = GateSink("a")
    a = started(pipeline("a", slow, pass_interval_seconds=4.0))
    wait_until(lambda: len(a._leased) == 2, what="A holds both shards")
    for n in range(20):
        stream.put_item({"pk": {"S": f"k{n}"}, "sk": {"S": "x"}, "version": {"N": "1"}})
    wait_until(lambda: a.stats.records_read == 20, what="A read every change (its sink is down)")
    joiner = MemorySink("b")
    b = started(pipeline("b", joiner, pass_interval_seconds=4.0))
    wait_until(lambda: bool(a._shedding), timeout=30, what="A gives a shard up for B")
    time.sleep(2 * LEASE["failover_seconds"])  # long past the failover time: A's sink is still down
    assert b._leased == {} and joiner.records == []  # the shard stays A's until what A read of it is delivered
    slow.up.set()
    wait_until(lambda: len(b._leased) == 1, timeout=30, what="B gets its share once A has delivered")
    stream.put_item({"pk": {"S": "late"}, "sk": {"S": "x"}, "version": {"N": "2"}})
    wait_until(lambda: len({r.event_id for r in slow.records + joiner.records}) == 21, what="everything delivered")
    time.sleep(1.0)
    twice = {r.event_id for r in slow.records} & {r.event_id for r in joiner.records}
    events = (dict(a.stats.lease_events), dict(b.stats.lease_events))
    assert twice == set(), (f"{len(twice)} change(s) delivered by both workers in a graceful handoff", events)


# A shard given up while its GetRecords is in flight is released only once that poll's page is delivered and
# checkpointed: the joiner does not read it again from the old checkpoint.
def test_a_shard_given_up_while_its_poll_is_in_flight_is_not_read_by_the_joiner_too(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    target = sorted(stream.open_shard_ids())[1]  # the one A gives up: sorted(mine)[share:]
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    first = MemorySink("a")
    a = started(pipeline("a", first))
    wait_until(lambda: len(a._leased) == 2 and len(a.scheduler.active_shard_ids()) == 2, what="A reads both")
    held = threading.Event()
    go = threading.Event()

    def hold(call: Any) -> None:  # A's poll of the target answered with records, not yet handed on
        ours = worker_of(call.client) == "a"
        if call.operation == "GetRecords" and call.shard_id == target and call.records and ours and not held.is_set():
            held.set()
            go.wait(30)

    simulator.on_call(hold)
    keys = [f"k{n}" for n in range(200) if stream.shard_for({"pk": {"S": f"k{n}"}, "sk": {"S": "x"}}) == target][:5]
    for key in keys:
        stream.put_item({"pk": {"S": key}, "sk": {"S": "x"}})
    wait_until(held.is_set, what="A's poll of the target in flight")
    second = MemorySink("b")
    b = started(pipeline("b", second))
    try:
        wait_until(lambda: target in a._shedding, timeout=15, what="A gives the target up while its poll is held")
        time.sleep(2 * LEASE["failover_seconds"])
        assert target not in b._leased  # not released while A's page of it is still on its way
    finally:
        go.set()
    wait_until(lambda: target in b._leased, timeout=15, what="B takes the target once A delivered its page")
    wait_until(lambda: len({r.event_id for r in first.records + second.records}) == 5, what="every change")
    time.sleep(1.0)
    twice = {r.event_id for r in first.records} & {r.event_id for r in second.records}
    events = dict(a.stats.lease_events)
    assert twice == set(), (f"{len(twice)} change(s) delivered by both workers in a graceful handoff", events)


# A pause of a worker (SIGSTOP, a VM or GC pause, a slow answer) between reading the rows and judging them: peers
# are judged by when the read was sent, so one that heartbeated all along is not taken for dead.
def test_a_worker_resuming_from_a_pause_takes_no_lease_from_a_live_peer(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    a = started(pipeline("a", MemorySink("a")))
    b = started(pipeline("b", MemorySink("b")))
    wait_until(lambda: len(a._leased) == 1 and len(b._leased) == 1, timeout=30, what="one shard each")
    assert a.store is not None
    real = a.store.load_state
    paused = threading.Event()

    def load_then_pause() -> Any:
        state = real()
        if not paused.is_set():
            # At the defaults (a beat every 3.3 s) the heartbeat read just before a pass and the pass's Query
            # nearly always show a peer's same beat value; here (a beat every 0.2 s) make that so.
            a.leases.observe(state.workers)
            paused.set()
            time.sleep(LEASE["failover_seconds"] + 1.0)  # the process stops right after the answer arrived
        return state

    a.store.load_state = load_then_pause  # type: ignore[method-assign]
    a._request_pass()
    wait_until(paused.is_set, what="A's pass read the rows")
    time.sleep(LEASE["failover_seconds"] + 1.0 + 3.0)  # A resumes and plans; B was heartbeating throughout
    # B may take A's shard (A was paused: that is the failover), but B never stopped, so nothing is taken from B.
    assert b.stats.lease_events["lost"] == 0, (dict(a.stats.lease_events), dict(b.stats.lease_events))


# Discovery scheduling readers while a shard is being given up (its own thread, at any moment): no reader of the
# shard is started once it is being given up, and none survives its release.
def test_discovery_scheduling_during_a_give_up_leaves_no_reader_of_the_released_shard(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    first = MemorySink("a")
    a = started(pipeline("a", first))
    wait_until(lambda: len(a._leased) == 2 and len(a.scheduler.active_shard_ids()) == 2, what="A reads both")
    real = a._stop_reading
    raced = threading.Event()

    def stop_then_discovery_runs(shard_id: str) -> Any:
        progress = real(shard_id)
        if threading.current_thread().name == "leases" and not raced.is_set():
            raced.set()
            a._schedule_readable()  # what the discovery thread may do at this moment
        return progress

    a._stop_reading = stop_then_discovery_runs  # type: ignore[method-assign]
    second = MemorySink("b")
    b = started(pipeline("b", second))
    wait_until(lambda: len(a._leased) == 1 and len(b._leased) == 1, timeout=30, what="one shard each")
    time.sleep(1.0)
    theirs = next(iter(b._leased))
    assert raced.is_set()
    assert theirs not in a.scheduler.active_shard_ids(), (
        f"A still polls {theirs}, now held by B",
        a.scheduler.active_shard_ids(),
        dict(a.stats.lease_events),
    )


class _HeldSink(MemorySink):
    """Writes wait on `gate` once armed; a batch of `slow` shard records takes 1 s more; flushes are not due (a
    buffering sink, e.g. the archive) while `hold_flush` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.armed = False
        self.gate = threading.Event()
        self.slow: str | None = None
        self.hold_flush = False

    def write(self, batch: Any) -> Any:
        if self.armed:
            self.gate.wait(30)
            if any(r.shard_id == self.slow for r in batch.records):
                time.sleep(1.0)
        return super().write(batch)

    def flush_due(self, now: float) -> bool:
        return not self.hold_flush


# Another shard's commit between the give-up and the given-up shard's last batch (a buffering sink whose flush is
# not due): the shard is released only once its own records are checkpointed, so the joiner reads none again.
def test_another_shards_commit_does_not_release_a_given_up_shard_before_its_records_are_checkpointed(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    other, target = sorted(stream.open_shard_ids())  # A gives up sorted(mine)[share:]
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    sink = _HeldSink("a")
    a = started(pipeline("a", sink))
    wait_until(lambda: len(a._leased) == 2 and len(a.scheduler.active_shard_ids()) == 2, what="A reads both")

    def keys_of(shard: str, n: int) -> list[str]:
        return [f"k{i}" for i in range(400) if stream.shard_for({"pk": {"S": f"k{i}"}, "sk": {"S": "x"}}) == shard][:n]

    sink.armed, sink.slow, sink.hold_flush = True, target, True
    stream.put_item({"pk": {"S": keys_of(other, 1)[0]}, "sk": {"S": "x"}})
    wait_until(lambda: a.stats.records_read == 1, what="A read the other shard's change")
    time.sleep(0.5)  # its batch closes and is submitted (held at the gate)
    for key in keys_of(target, 3):
        stream.put_item({"pk": {"S": key}, "sk": {"S": "x"}})
    wait_until(lambda: a.stats.records_read == 4, what="A read the target's changes")
    time.sleep(0.5)  # their batch closes and is submitted behind the first
    second = MemorySink("b")
    started(pipeline("b", second))
    wait_until(lambda: target in a._shedding, timeout=15, what="A gives the target up")
    sink.gate.set()  # the other shard's batch completes and is committed, the target's 1 s later
    time.sleep(2 * LEASE["failover_seconds"])
    sink.hold_flush = False
    wait_until(lambda: len({r.event_id for r in sink.records + second.records}) == 4, what="every change")
    time.sleep(1.0)
    twice = {r.event_id for r in sink.records} & {r.event_id for r in second.records}
    assert twice == set(), (
        f"{len(twice)} change(s) delivered by both workers in a graceful handoff",
        dict(a.stats.lease_events),
        a.stats.committed.get(target),
    )


# A heartbeat still under way (a slow answer) at the stop must not land after the stop deleted the worker's row:
# peers would count a departed worker as live for the failover time and keep to half the shards.
def test_a_heartbeat_under_way_at_the_stop_leaves_no_worker_row(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    a = pipeline("a", MemorySink("a"))
    a.start()
    b = started(pipeline("b", MemorySink("b"), failover_seconds=8.0))
    wait_until(lambda: len(a._leased) == 1 and len(b._leased) == 1, timeout=30, what="one shard each")
    assert a.store is not None and b.store is not None
    real = a.store.heartbeat
    slow = threading.Event()
    beating = threading.Event()

    def throttled(*args: Any, **kwargs: Any) -> None:
        if slow.is_set():
            beating.set()
            time.sleep(6.0)  # a throttled heartbeat write, retried
        real(*args, **kwargs)

    a.store.heartbeat = throttled  # type: ignore[method-assign]
    slow.set()
    wait_until(beating.is_set, what="A's heartbeat under way")
    a.stop(timeout=5)
    time.sleep(1.5)  # the beat lands
    workers, _ = b.store.coordination()
    assert "a" not in workers, "A's heartbeat row is back after A left"


class _SlowGet(dict):  # type: ignore[type-arg]
    """A dict whose get() gives the GIL away: the switch between _lose's check and its `del`."""

    def get(self, *args: Any) -> Any:
        value = super().get(*args)
        time.sleep(0.05)
        return value


# The delivery thread (a refused save) and the lease thread (a pass) losing the same lease at once: one of them
# drops it, neither raises (in the delivery thread an error would stop the pipeline).
def test_two_threads_losing_the_same_lease_at_once_do_not_raise(make_settings: Callable[..., Settings]) -> None:
    pipeline = Pipeline(make_settings(lease={"worker_id": "a"}), sinks=[MemorySink()])
    pipeline._leased = _SlowGet({"s1": 4})
    errors: list[BaseException] = []

    def lose() -> None:
        try:
            pipeline._lose("s1", "refused", 4)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lose) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors
