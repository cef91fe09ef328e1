"""Changes as messages on an SQS queue, one message per change, sent with SendMessageBatch.

Standard queues deliver at least once and in no particular order: a consumer must tolerate duplicates and
changes to one item arriving out of order (compare `sequenceNumber`). FIFO queues (the URL ends in `.fifo`)
keep each item's changes in stream order: the message group is the item's key and the deduplication id the
event id, so a resend within SQS's five-minute window is dropped. Bodies, attributes and batching:
`sinks.messages`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, field_validator

from sinks.messages import (
    EntryFailure,
    MessageSink,
    MessageSinkSettings,
    OutgoingMessage,
    batch_entries,
    failures_by_position,
)

_QUEUE_URL = re.compile(r"^https?://[^/\s]+/\d{12}/[A-Za-z0-9_-]{1,80}(\.fifo)?$")


class SqsSinkSettings(MessageSinkSettings):
    """`[[sinks]] type = "sqs"`: one message per change on a standard or FIFO queue."""

    type: Literal["sqs"]
    queue_url: str = Field(
        description="The queue's URL, https://sqs.<region>.amazonaws.com/<account id>/<name>; a name ending in "
        "'.fifo' is a FIFO queue, which keeps each item's changes in order."
    )

    @field_validator("queue_url")
    @classmethod
    def _queue_url_shape(cls, url: str) -> str:
        if not _QUEUE_URL.match(url):
            raise ValueError(
                "queue_url must be a queue URL such as https://sqs.us-east-1.amazonaws.com/123456789012/changes "
                f"(the URL, not the ARN or the name); got {url!r}"
            )
        return url

    @property
    def address(self) -> str:
        return self.queue_url


class SqsSink(MessageSink[SqsSinkSettings]):
    service = "sqs"
    kind = "SQS queue"

    def _check_destination(self) -> None:
        self.client.get_queue_attributes(QueueUrl=self.settings.queue_url, AttributeNames=["QueueArn"])

    def _send(self, call: Sequence[OutgoingMessage]) -> Mapping[int, EntryFailure]:
        entries = batch_entries(call, "MessageBody")
        return failures_by_position(self.client.send_message_batch(QueueUrl=self.settings.queue_url, Entries=entries))
