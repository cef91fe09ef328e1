"""Which failures are worth another try: the one classification every AWS call and sink write shares.

A bottom-floor module (it imports nothing of the pipeline), so that sinks, the checkpoint store and the retry
policy can all use it without importing each other.
"""

from __future__ import annotations

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)

RETRYABLE_ERROR_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "LimitExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

TRANSPORT_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
    HTTPClientError,
)
"""botocore's errors for a request that got no answer: connection refused or reset, timeouts."""


class RetryableError(Exception):
    """A failure that trying again later may cure. `retry_after` is a server's hint, in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx and transport failures are worth another try; everything else is not."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, ClientError):
        status = http_status(exc)
        return error_code(exc) in RETRYABLE_ERROR_CODES or status >= 500 or status == 429
    return isinstance(exc, TRANSPORT_ERRORS)
