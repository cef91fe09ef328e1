"""Changes published to an SNS topic, one message per change, with PublishBatch.

The point of a topic is fan-out: each subscriber picks the changes it wants with a filter policy on the
`event_name` and `table` message attributes, without parsing bodies. Standard topics deliver at least once and
in no particular order. FIFO topics (the ARN ends in `.fifo`) keep each item's changes in stream order for
FIFO queue subscribers: the message group is the item's key and the deduplication id the event id. Bodies,
attributes and batching: `sinks.messages`.
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

_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")


class SnsSinkSettings(MessageSinkSettings):
    """`[[sinks]] type = "sns"`: one message per change on a standard or FIFO topic."""

    type: Literal["sns"]
    topic_arn: str = Field(
        description="The topic's ARN, arn:aws:sns:<region>:<account id>:<name>; a name ending in '.fifo' is a "
        "FIFO topic, which keeps each item's changes in order."
    )

    @field_validator("topic_arn")
    @classmethod
    def _topic_arn_shape(cls, arn: str) -> str:
        if not _TOPIC_ARN.match(arn):
            raise ValueError(
                "topic_arn must be a topic ARN such as arn:aws:sns:us-east-1:123456789012:changes "
                f"(the ARN, not the name); got {arn!r}"
            )
        return arn

    @property
    def address(self) -> str:
        return self.topic_arn


class SnsSink(MessageSink[SnsSinkSettings]):
    service = "sns"
    kind = "SNS topic"

    def _check_destination(self) -> None:
        self.client.get_topic_attributes(TopicArn=self.settings.topic_arn)

    def _send(self, call: Sequence[OutgoingMessage]) -> Mapping[int, EntryFailure]:
        entries = batch_entries(call, "Message")
        response = self.client.publish_batch(TopicArn=self.settings.topic_arn, PublishBatchRequestEntries=entries)
        return failures_by_position(response)
