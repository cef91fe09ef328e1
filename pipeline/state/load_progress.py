"""LoadStore: an initial load's progress, in one row (`#load`) of the checkpoint table's partition for the stream.

The row says which load this is (`load_id`, fixed at its first start, so a restart resumes it rather than
starting another), how far each segment got (`progress`: the resume token of the last page every sink has
taken, the pages and items done), its phase, and which worker runs it (`owner`, `lease_epoch`: like a shard's
lease, every progress write is conditional on both, so a worker that lost the load cannot move it).

Phases: `loading` (segments running), `finished` (every item delivered and flushed: no SNAPSHOT record arrives
any more, but sinks may still hold what only the load needed, a replica's tombstones), `done` (cleaned up).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from botocore.exceptions import ClientError

from pipeline.errors import error_code
from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)

LOAD_ROW = "#load"
Phase = Literal["loading", "finished", "done"]
Mode = Literal["scan", "export"]


@dataclass(frozen=True, slots=True)
class SegmentProgress:
    resume: str | None = None
    """The resume token of the last committed page (None: from the start, or nothing left when `done`)."""
    next_page: int = 0
    items: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class LoadState:
    load_id: str
    mode: Mode
    phase: Phase
    segments: int
    started_at: str
    progress: dict[int, SegmentProgress] = field(default_factory=dict)
    owner: str | None = None
    lease_epoch: int = 0
    estimated_items: int | None = None
    export_arn: str | None = None
    finished_at: str | None = None
    done_at: str | None = None
    since: float | None = None
    """The stream's first-start moment the load began after (epoch seconds): an export must not be older."""

    @property
    def items(self) -> int:
        return sum(p.items for p in self.progress.values())

    @property
    def segments_done(self) -> int:
        return sum(1 for p in self.progress.values() if p.done)


class LoadLostError(Exception):
    """Another worker holds the load now: this one must stop copying (its progress writes are refused)."""


class LoadStore:
    def __init__(self, dynamodb: Any, *, table_name: str, partition: str, retry: RetryPolicy, worker: str) -> None:
        self._ddb = dynamodb
        self._table = table_name
        self._partition = partition
        self._retry = retry
        self._worker = worker
        self._epoch: int | None = None
        """The lease epoch this worker took the load at; None while it does not hold it."""

    @property
    def holding(self) -> bool:
        return self._epoch is not None

    @property
    def epoch(self) -> int | None:
        """The lease epoch this worker took the load at, while it holds it."""
        return self._epoch

    def forget(self) -> None:
        """This worker no longer holds the load (it read the row showing another owner)."""
        self._epoch = None

    def _key(self) -> dict[str, Any]:
        return {"stream": {"S": self._partition}, "shard_id": {"S": LOAD_ROW}}

    def read(self) -> LoadState | None:
        answer = self._retry.call(
            "GetItem (initial load)", self._ddb.get_item, TableName=self._table, Key=self._key(), ConsistentRead=True
        )
        item = answer.get("Item")
        return None if item is None else _state_from_item(item)

    def begin(
        self, load_id: str, mode: Mode, segments: int, estimated_items: int | None, since: float | None
    ) -> LoadState:
        """Record a new load unless one is recorded already; returns the one that holds (a resumed load keeps its
        id, mode and segments whatever the configuration says now)."""
        now = datetime.now(UTC).isoformat()
        item: dict[str, Any] = {
            **self._key(),
            "load_id": {"S": load_id},
            "mode": {"S": mode},
            "phase": {"S": "loading"},
            "segments": {"N": str(segments)},
            "started_at": {"S": now},
            "lease_epoch": {"N": "0"},
            "progress": {
                "M": {str(s): _progress_value(SegmentProgress()) for s in range(segments)},
            },
        }
        if estimated_items is not None:
            item["estimated_items"] = {"N": str(estimated_items)}
        if since is not None:
            item["since"] = {"N": repr(since)}
        try:
            self._retry.call(
                "PutItem (initial load)",
                self._ddb.put_item,
                TableName=self._table,
                Item=item,
                ConditionExpression="attribute_not_exists(shard_id)",
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        state = self.read()
        assert state is not None
        return state

    def take(self, state: LoadState) -> LoadState | None:
        """Take the load from `state` (free, or its owner is gone): conditional on the epoch read, so of two
        workers trying at once one wins. Returns the state as taken, or None."""
        epoch = state.lease_epoch + 1
        try:
            self._retry.call(
                "UpdateItem (take initial load)",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(),
                UpdateExpression="SET #owner = :me, lease_epoch = :new",
                ConditionExpression="lease_epoch = :old",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self._worker},
                    ":new": {"N": str(epoch)},
                    ":old": {"N": str(state.lease_epoch)},
                },
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return None
        self._epoch = epoch
        taken = self.read()
        return taken

    def save(self, positions: Mapping[int, SegmentProgress]) -> None:
        """Move segments forward (after every sink took their pages). Raises `LoadLostError` when refused."""
        if not positions:
            return
        names: dict[str, str] = {"#owner": "owner"}
        values: dict[str, Any] = {":me": {"S": self._worker}, ":epoch": {"N": str(self._epoch)}}
        sets: list[str] = []
        for n, (segment, progress) in enumerate(sorted(positions.items())):
            names[f"#s{n}"] = str(segment)
            values[f":p{n}"] = _progress_value(progress)
            sets.append(f"progress.#s{n} = :p{n}")
        self._conditional_update("UpdateItem (initial load progress)", "SET " + ", ".join(sets), names, values)

    def set_export(self, export_arn: str) -> None:
        self._conditional_update(
            "UpdateItem (initial load export)",
            "SET export_arn = :arn",
            {"#owner": "owner"},
            {":me": {"S": self._worker}, ":epoch": {"N": str(self._epoch)}, ":arn": {"S": export_arn}},
        )

    def set_estimate(self, items: int) -> None:
        self._conditional_update(
            "UpdateItem (initial load estimate)",
            "SET estimated_items = :n",
            {"#owner": "owner"},
            {":me": {"S": self._worker}, ":epoch": {"N": str(self._epoch)}, ":n": {"N": str(items)}},
        )

    def finish(self) -> None:
        """Every item is delivered: phase `finished`."""
        self._conditional_update(
            "UpdateItem (initial load finished)",
            "SET phase = :finished, finished_at = :now",
            {"#owner": "owner"},
            {
                ":me": {"S": self._worker},
                ":epoch": {"N": str(self._epoch)},
                ":finished": {"S": "finished"},
                ":now": {"S": datetime.now(UTC).isoformat()},
            },
        )

    def mark_done(self, cleaned: int) -> None:
        self._conditional_update(
            "UpdateItem (initial load done)",
            "SET phase = :done, done_at = :now, cleaned = :n",
            {"#owner": "owner"},
            {
                ":me": {"S": self._worker},
                ":epoch": {"N": str(self._epoch)},
                ":done": {"S": "done"},
                ":now": {"S": datetime.now(UTC).isoformat()},
                ":n": {"N": str(cleaned)},
            },
        )

    def release(self) -> None:
        """Give the load up (a stop): a peer, or the next start, takes it at once rather than after failover."""
        if self._epoch is None:
            return
        epoch, self._epoch = self._epoch, None
        try:
            self._retry.call(
                "UpdateItem (release initial load)",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(),
                UpdateExpression="REMOVE #owner SET lease_epoch = :new",
                ConditionExpression="#owner = :me AND lease_epoch = :epoch",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self._worker},
                    ":epoch": {"N": str(epoch)},
                    ":new": {"N": str(epoch + 1)},
                },
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def _conditional_update(self, what: str, update: str, names: dict[str, str], values: dict[str, Any]) -> None:
        if self._epoch is None:
            raise LoadLostError("this worker does not hold the initial load")
        try:
            self._retry.call(
                what,
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(),
                UpdateExpression=update,
                ConditionExpression="#owner = :me AND lease_epoch = :epoch",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            self._epoch = None
            raise LoadLostError("another worker took the initial load over") from exc


def _progress_value(progress: SegmentProgress) -> dict[str, Any]:
    value: dict[str, Any] = {
        "next_page": {"N": str(progress.next_page)},
        "items": {"N": str(progress.items)},
        "done": {"BOOL": progress.done},
    }
    if progress.resume is not None:
        value["resume"] = {"S": progress.resume}
    return {"M": value}


def _state_from_item(item: Mapping[str, Any]) -> LoadState:
    def text(name: str) -> str | None:
        value = item.get(name)
        return None if value is None else str(value["S"])

    def number(name: str) -> int | None:
        value = item.get(name)
        return None if value is None else int(value["N"])

    progress: dict[int, SegmentProgress] = {}
    for segment, value in item.get("progress", {}).get("M", {}).items():
        fields = value["M"]
        progress[int(segment)] = SegmentProgress(
            resume=fields["resume"]["S"] if "resume" in fields else None,
            next_page=int(fields["next_page"]["N"]),
            items=int(fields["items"]["N"]),
            done=bool(fields["done"]["BOOL"]),
        )
    since = item.get("since")
    phase = text("phase") or "loading"
    mode = text("mode") or "scan"
    assert phase in ("loading", "finished", "done") and mode in ("scan", "export")
    return LoadState(
        load_id=text("load_id") or "",
        mode=mode,  # type: ignore[arg-type]  # checked above
        phase=phase,  # type: ignore[arg-type]
        segments=number("segments") or len(progress),
        started_at=text("started_at") or "",
        progress=progress,
        owner=text("owner"),
        lease_epoch=number("lease_epoch") or 0,
        estimated_items=number("estimated_items"),
        export_arn=text("export_arn"),
        finished_at=text("finished_at"),
        done_at=text("done_at"),
        since=None if since is None else float(since["N"]),
    )


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What `status`, metrics and the console show of a load."""

    load_id: str
    mode: str
    phase: str
    items: int
    estimated_items: int | None
    segments: int
    segments_done: int
    owner: str | None
    eta_seconds: float | None
    items_per_second: float | None
    started_at: str | None = None
    finished_at: str | None = None
    """When every item was delivered (ISO 8601): the copy's own end, before the clean-up."""
    done_at: str | None = None


def eta_seconds(state: LoadState, rate: float | None) -> float | None:
    """Seconds until the items expected are copied, at `rate` items a second; None when either is unknown."""
    if not rate or state.estimated_items is None:
        return None
    return max(0.0, state.estimated_items - state.items) / rate


def report_of(state: LoadState, now: datetime | None = None) -> LoadReport:
    """A report from the row alone (`streamsink status`, another process): the rate over the whole load so far."""
    rate = None
    if state.phase == "loading" and state.started_at and state.items:
        elapsed = ((now or datetime.now(UTC)) - datetime.fromisoformat(state.started_at)).total_seconds()
        if elapsed > 0:
            rate = state.items / elapsed
    eta = eta_seconds(state, rate)
    return LoadReport(
        state.load_id,
        state.mode,
        state.phase,
        state.items,
        state.estimated_items,
        state.segments,
        state.segments_done,
        state.owner,
        eta,
        rate,
        state.started_at,
        state.finished_at,
        state.done_at,
    )


def load_report_json(report: LoadReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "load_id": report.load_id,
        "mode": report.mode,
        "phase": report.phase,
        "items": report.items,
        "estimated_items": report.estimated_items,
        "segments": report.segments,
        "segments_done": report.segments_done,
        "owner": report.owner,
        "eta_seconds": None if report.eta_seconds is None else round(report.eta_seconds, 1),
        "items_per_second": None if report.items_per_second is None else round(report.items_per_second, 1),
        "started_at": report.started_at,
        "finished_at": report.finished_at,
        "done_at": report.done_at,
    }
