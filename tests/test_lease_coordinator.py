"""LeaseCoordinator's decisions from rows and heartbeats, on a clock the test moves: no AWS needed."""

from __future__ import annotations

from pipeline.state.checkpoint import Checkpoint, StoredState, WorkerBeat
from pipeline.state.leases import LeaseCoordinator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(worker: str, n: int, *, heartbeat_at: str = "2020-01-01T00:00:00+00:00", pid: int | None = None) -> WorkerBeat:
    return WorkerBeat(worker, n, 0, heartbeat_at, pid=pid, identity="host/boot/ns" if pid else None)


def rows(owners: dict[str, str | None]) -> dict[str, Checkpoint]:
    return {s: Checkpoint(s, None, False, owner=o, lease_epoch=1 if o else 0) for s, o in owners.items()}


def state(owners: dict[str, str | None], *beats: WorkerBeat) -> StoredState:
    return StoredState(rows(owners), None, {b.worker: b for b in beats})


def test_a_heartbeat_that_moves_on_keeps_a_worker_live_whatever_its_wall_clock_says() -> None:
    clock = Clock()
    me = LeaseCoordinator("me", failover_seconds=10, clock=clock)
    for n in range(5):
        me.observe({"peer": beat("peer", n, heartbeat_at="1999-01-01T00:00:00+00:00")})  # a clock far behind
        clock.now += 9
        assert me.is_live("peer")
    clock.now += 2  # 11 s without the counter moving on: expired, judged on this worker's clock alone
    assert not me.is_live("peer")
    me.observe({"peer": beat("peer", 5)})
    assert me.is_live("peer")


def test_a_worker_first_seen_is_given_the_whole_failover_time() -> None:
    clock = Clock()
    me = LeaseCoordinator("me", failover_seconds=10, clock=clock)
    me.observe({"old": beat("old", 7)})  # it may have stopped long ago: this worker cannot know yet
    clock.now += 9.9
    assert me.is_live("old")
    clock.now += 0.2
    assert not me.is_live("old")
    assert me.is_live("gone-without-a-row")  # an owner with no heartbeat row at all is timed the same way
    clock.now += 10.1
    assert not me.is_live("gone-without-a-row")


def test_a_peer_on_this_host_whose_process_is_gone_is_expired_at_once() -> None:
    me = LeaseCoordinator(
        "me", failover_seconds=10, clock=Clock(), identity="host/boot/ns", process_gone=lambda pid: pid == 41
    )
    me.observe({"dead": beat("dead", 1, pid=41), "alive": beat("alive", 1, pid=42)})
    assert not me.is_live("dead")
    assert me.is_live("alive")
    other_host = LeaseCoordinator("me", failover_seconds=10, clock=Clock(), identity="elsewhere/b/n")
    other_host.observe({"dead": beat("dead", 1, pid=41)})
    assert other_host.is_live("dead")  # a pid means nothing on another host


def test_free_and_expired_shards_are_taken_up_to_the_share_and_nothing_is_stolen_meanwhile() -> None:
    clock = Clock()
    me = LeaseCoordinator("me", failover_seconds=10, clock=clock)
    owners: dict[str, str | None] = {f"s{n}": None for n in range(6)}
    owners.update({"s6": "peer", "s7": "peer", "s8": "peer", "s9": "dead"})
    me.observe({"peer": beat("peer", 1), "dead": beat("dead", 1)})
    clock.now += 11
    plan = me.plan(state(owners, beat("peer", 2), beat("dead", 1)), list(owners))
    assert plan.live_workers == 2 and plan.share == 5
    assert len(plan.take) == 5
    assert "s9" in {row.shard_id for row in plan.take}  # the expired worker's shard comes first
    assert plan.steal is None and plan.shed == []


def test_one_shard_is_stolen_per_pass_and_only_from_a_worker_above_the_share() -> None:
    clock = Clock()
    me = LeaseCoordinator("me", failover_seconds=10, steal_after_seconds=20, clock=clock)
    owners: dict[str, str | None] = {f"s{n}": "busy" for n in range(7)}
    owners.update({"s7": "even", "s8": "even", "s9": "even"})
    first = me.plan(state(owners, beat("busy", 1), beat("even", 1)), list(owners))
    assert first.share == 4 and first.take == []
    assert first.steal is None  # it may be giving leases up already: give it a pass interval
    clock.now += 19
    assert me.plan(state(owners, beat("busy", 2), beat("even", 2)), list(owners)).steal is None
    clock.now += 1
    plan = me.plan(state(owners, beat("busy", 3), beat("even", 3)), list(owners))
    assert plan.steal is not None and plan.steal.owner == "busy"
    owners["s0"] = "even"  # it gave one up since: shedding, not stuck
    clock.now += 30
    assert me.plan(state(owners, beat("busy", 4), beat("even", 4)), list(owners)).steal is None
    balanced = {f"s{n}": "a" for n in range(2)} | {f"s{n}": "b" for n in range(2, 4)}
    assert me.plan(state(balanced, beat("a", 1), beat("b", 1)), list(balanced)).steal is None  # 2 each: even


def test_leases_above_the_share_are_given_up_when_peers_appear() -> None:
    me = LeaseCoordinator("me", failover_seconds=10, clock=Clock())
    owners: dict[str, str | None] = {f"s{n:02d}": "me" for n in range(32)}
    plan = me.plan(state(owners, beat("me", 3), beat("b", 1), beat("c", 1)), list(owners))
    assert plan.share == 11
    assert len(plan.shed) == 21
    alone = me.plan(state(owners, beat("me", 4)), list(owners))
    assert alone.shed == []  # nobody to take them


def test_finished_and_not_yet_readable_shards_are_no_part_of_the_share() -> None:
    me = LeaseCoordinator("me", failover_seconds=10, clock=Clock())
    stored = state({"parent": None, "child": None, "done": "peer"}, beat("peer", 1))
    stored.checkpoints["done"] = Checkpoint("done", "9", True, owner="peer", lease_epoch=1)
    plan = me.plan(stored, ["parent"])  # the child waits for its parent: not readable yet
    assert [row.shard_id for row in plan.take] == ["parent"]
    assert plan.share == 1


def test_a_worker_expiring_between_two_looks_is_a_change_worth_a_pass() -> None:
    """Expiry happens while nobody looks (time passes, a process ends): the next look must report it, or the
    orphans wait for the next scheduled pass instead of being taken at the next heartbeat."""
    clock = Clock()
    gone = {"pid": False}
    me = LeaseCoordinator(
        "me", failover_seconds=10, clock=clock, identity="host/boot/ns", process_gone=lambda pid: gone["pid"]
    )
    assert me.observe({"quiet": beat("quiet", 1), "local": beat("local", 1, pid=7)}) is True  # two joined
    assert me.observe({"quiet": beat("quiet", 1), "local": beat("local", 2, pid=7)}) is False
    gone["pid"] = True  # the local peer's process ended
    assert me.observe({"quiet": beat("quiet", 1), "local": beat("local", 2, pid=7)}) is True
    clock.now += 11  # the quiet one's heartbeat stood still past the failover time
    assert me.observe({"quiet": beat("quiet", 1), "local": beat("local", 2, pid=7)}) is True
    assert me.live_workers() == ["me"]
