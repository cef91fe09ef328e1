"""boto3 clients for the pipeline: one session, botocore's retries off (the retry policy owns them).

Where to connect follows the conventions every AWS tool shares, so that a user's existing setup works unchanged:
credentials come from boto3's default chain (environment, `AWS_PROFILE` and the shared files, SSO, container
and instance roles), and a region the configuration leaves unset comes from `AWS_REGION`, `AWS_DEFAULT_REGION` or
the profile, as `resolve_region` says.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ProfileNotFound

from pipeline.version import version
from pipeline.wire import install_fast_get_records, install_fast_scan

STREAM_ARN_FORM = "arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL"
_STREAM_ARN = re.compile(r"arn:aws[a-z-]*:dynamodb:[a-z0-9-]+:\d{12}:table/[^/\s]+/stream/[^/\s]+")


class NoRegionError(ValueError):
    """No region was configured and none was found where AWS tools look for one; the message says where to set it."""


def resolve_region(region: str | None, *, setting: str = "source.region") -> str:
    """`region` if set, else the region AWS tools would use: `AWS_REGION`, then boto3's own resolution
    (`AWS_DEFAULT_REGION`, then the `region` of the profile `AWS_PROFILE` names in the shared config file).

    boto3 itself reads only `AWS_DEFAULT_REGION`, but `AWS_REGION` is what the other SDKs, Lambda and ECS set, and
    what a container is given with `-e AWS_REGION=...`. `setting` names the key or option that sets the region
    explicitly, for the error when none is found."""
    if region:
        return region
    from_environment = os.environ.get("AWS_REGION", "").strip()
    if from_environment:
        return from_environment
    # botocore's order: AWS_DEFAULT_PROFILE wins over AWS_PROFILE.
    variable = next((name for name in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE") if os.environ.get(name)), None)
    profile = os.environ[variable] if variable else None
    try:
        found = boto3.session.Session().region_name
    except ProfileNotFound:
        raise NoRegionError(
            f"{setting}: not set, and profile {profile!r} ({variable}) is not in the AWS config files; "
            f"fix {variable}, or set {setting} or AWS_REGION"
        ) from None
    if found:
        return str(found)
    config_file = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    raise NoRegionError(
        f"{setting}: not set, and no region in AWS_REGION, AWS_DEFAULT_REGION or profile {profile or 'default'!r} "
        f"of {config_file}; set {setting} (or AWS_REGION, e.g. AWS_REGION=us-east-1)"
    )


def is_stream_arn(text: str) -> bool:
    """Whether `text` has the form of a DynamoDB stream ARN (STREAM_ARN_FORM)."""
    return _STREAM_ARN.fullmatch(text) is not None


def region_of_arn(arn: str | None) -> str | None:
    """arn:aws:dynamodb:REGION:... -> REGION; None when `arn` does not name one."""
    parts = (arn or "").split(":")
    return parts[3] if len(parts) > 3 and parts[3] else None


class AwsClients:
    """Builds and caches clients; boto3 clients are thread-safe once built, sessions are not.

    `region` None resolves as `resolve_region` does (raising `NoRegionError` when nothing is found).
    `fast_get_records` (on by default) has `dynamodbstreams` clients parse GetRecords bodies with orjson
    (pipeline.wire): records arrive in wire form, about ten times cheaper than botocore's parser.
    """

    def __init__(
        self,
        region: str | None,
        endpoint_url: str | None = None,
        max_pool_connections: int = 10,
        *,
        fast_get_records: bool = True,
        agent: str | None = None,
    ) -> None:
        self.region = resolve_region(region)
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
            # `agent` (the worker) tells in CloudTrail, and in the stream simulator's call log, who called.
            user_agent=f"streamsink/{version()}" + (f" {agent}" if agent else ""),
            parameter_validation=False,
        )
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str | None], Any] = {}
        self.stream_service_time: float | None = None
        """The DynamoDB Streams service's clock (the Date of its latest answer), and the host's monotonic clock
        when it was read: how old a record is, measured as the service that will trim it measures."""
        self._stream_time_read_at = 0.0

    def client(self, service: str, region: str | None = None, endpoint_url: str | None = None) -> Any:
        key = (service, region or self.region, endpoint_url or self.endpoint_url)
        with self._lock:
            if key not in self._cache:
                client = self._session.client(service, region_name=key[1], endpoint_url=key[2], config=self._config)
                if service == "dynamodbstreams":
                    client.meta.events.register("after-call.dynamodb-streams", self._note_service_time)
                    if self.fast_get_records:
                        install_fast_get_records(client)
                self._cache[key] = client
            return self._cache[key]

    def scan_client(self) -> Any:
        """A `dynamodb` client of its own for an initial load's Scan, parsed by `pipeline.wire.parse_scan`."""
        key = ("dynamodb-scan", self.region, self.endpoint_url)
        with self._lock:
            if key not in self._cache:
                client = self._session.client(
                    "dynamodb", region_name=self.region, endpoint_url=self.endpoint_url, config=self._config
                )
                install_fast_scan(client)
                self._cache[key] = client
            return self._cache[key]

    def _note_service_time(self, parsed: Any = None, **_kwargs: Any) -> None:
        date = (parsed or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return
        try:
            when = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.stream_service_time = when
        self._stream_time_read_at = time.monotonic()

    def stream_now(self) -> float:
        """Now on the stream service's clock: its latest Date moved on by the host's time since (whole seconds:
        the Date header has no more); the host's clock before any answer."""
        if self.stream_service_time is None:
            return time.time()
        return self.stream_service_time + (time.monotonic() - self._stream_time_read_at)
