"""boto3 clients for the pipeline: one session, botocore's retries off (the retry policy owns them)."""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config


class AwsClients:
    """Builds and caches clients; boto3 clients are thread-safe once built, sessions are not."""

    def __init__(self, region: str, endpoint_url: str | None = None, max_pool_connections: int = 10) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self._session = boto3.session.Session()
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=max_pool_connections,
        )
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str | None], Any] = {}

    def client(self, service: str, region: str | None = None, endpoint_url: str | None = None) -> Any:
        key = (service, region or self.region, endpoint_url or self.endpoint_url)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._session.client(
                    service, region_name=key[1], endpoint_url=key[2], config=self._config
                )
            return self._cache[key]
