"""boto3 clients for the pipeline: one session, botocore's retries off (the retry policy owns them)."""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Any

import boto3
from botocore.config import Config

from pipeline.wire import install_fast_get_records


def _version() -> str:
    try:
        return importlib.metadata.version("streamsink")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


class AwsClients:
    """Builds and caches clients; boto3 clients are thread-safe once built, sessions are not.

    `fast_get_records` (on by default) has `dynamodbstreams` clients parse GetRecords bodies with orjson
    (pipeline.wire): records arrive in wire form, about ten times cheaper than botocore's parser.
    """

    def __init__(
        self,
        region: str,
        endpoint_url: str | None = None,
        max_pool_connections: int = 10,
        *,
        fast_get_records: bool = True,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.fast_get_records = fast_get_records
        self._session = boto3.session.Session()
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=max_pool_connections,
            # CPU per call is what bounds a sink once calls overlap (a replica makes one call per item). botocore
            # builds its User-Agent afresh for every request unless it is given one (about a quarter of a small
            # call's CPU), and it validates every request against the model, which the service does anyway.
            user_agent=f"streamsink/{_version()}",
            parameter_validation=False,
        )
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str | None], Any] = {}

    def client(self, service: str, region: str | None = None, endpoint_url: str | None = None) -> Any:
        key = (service, region or self.region, endpoint_url or self.endpoint_url)
        with self._lock:
            if key not in self._cache:
                client = self._session.client(service, region_name=key[1], endpoint_url=key[2], config=self._config)
                if service == "dynamodbstreams" and self.fast_get_records:
                    install_fast_get_records(client)
                self._cache[key] = client
            return self._cache[key]
