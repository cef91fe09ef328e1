"""Where records go that a sink refused for good: each with its full payload, the sink and the reason.

AWS Lambda's on-failure destination keeps only the shard and sequence range, leaving the operator to fetch the
records before the stream trims them. A dead letter here carries the record itself, so it can be inspected and
replayed at any time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.records import ChangeRecord, to_json_bytes
from sinks.base import SinkError


def dead_letter_entry(record: ChangeRecord, sink_name: str, error: SinkError) -> dict[str, Any]:
    return {
        "sink": sink_name,
        "error": str(error),
        "error_kind": type(error).__name__,
        "failed_at": datetime.now(UTC).isoformat(),
        "event_id": record.event_id,
        "shard_id": record.shard_id,
        "sequence_number": record.sequence_number,
        "table": record.table,
        "record": record.raw,
    }


class JsonlDeadLetters:
    """Appends one JSON object per line and fsyncs before returning, so a checkpoint never outruns it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    def put(self, sink_name: str, refused: Sequence[tuple[ChangeRecord, SinkError]]) -> None:
        if not refused:
            return
        lines = b"".join(
            to_json_bytes(dead_letter_entry(record, sink_name, error)) + b"\n" for record, error in refused
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as out:
                out.write(lines)
                out.flush()
                os.fsync(out.fileno())
            self.count += len(refused)
