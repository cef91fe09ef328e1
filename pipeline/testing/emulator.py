"""The embedded AWS stand-in: an in-process moto server on a free loopback port.

Everything talks to it over HTTP exactly as to AWS (boto3, s3fs, pyarrow), so the demo and the tests exercise
the same code paths production does. moto's streams are simpler than DynamoDB's (one shard, no splits, no
iterator expiry); see README "Testing" for what is and is not shown by it.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class EmulatorUnavailableError(RuntimeError):
    """moto is not installed (streamsink was installed without its `demo` extra)."""


class EmbeddedAws:
    """`with EmbeddedAws() as aws: aws.endpoint_url` - a moto server for the duration of the block."""

    def __init__(self, region: str = "us-east-1") -> None:
        self.region = region
        self._server: Any = None
        self.endpoint_url = ""

    def start(self) -> EmbeddedAws:
        try:
            # Imported here, not at the top: moto is an optional extra, and the pipeline never needs it.
            from moto.server import ThreadedMotoServer
        except ImportError:
            # streamsink is installed from a clone, not from a package index: the extra is named on the clone.
            raise EmulatorUnavailableError(
                "the embedded AWS stand-in needs moto, which is not installed; "
                'from the clone, run pip install -e ".[demo]"'
            ) from None
        for name, value in DUMMY_CREDENTIALS.items():
            os.environ.setdefault(name, value)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url)

    def __enter__(self) -> EmbeddedAws:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def create_stream_table(dynamodb: Any, table_name: str) -> str:
    """A table keyed (pk, sk) with a NEW_AND_OLD_IMAGES stream; returns the stream ARN."""
    dynamodb.create_table(
        TableName=table_name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    return str(dynamodb.describe_table(TableName=table_name)["Table"]["LatestStreamArn"])
