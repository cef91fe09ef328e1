"""The one retry policy: every AWS call and every sink write goes through `RetryPolicy`.

botocore's own retries are switched off (see `pipeline.aws`) so that this is the only place that decides how
often and how long to wait, and so that the numbers an operator configures are the numbers that happen.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

from pipeline.errors import RetryableError, is_retryable
from pipeline.settings import RetrySettings

T = TypeVar("T")
log = logging.getLogger(__name__)


class ShutdownInterruptedError(Exception):
    """A retry wait was cut short because the pipeline is being stopped: the work is left for the next run."""


class _BackoffWithHint(tenacity.wait.wait_base):
    """Exponential back-off with full jitter, never shorter than a server's retry-after hint."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        ceiling = min(self._maximum, self._initial * 2 ** (retry_state.attempt_number - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RetryableError) and error.retry_after:
            delay = max(delay, error.retry_after)
        return delay


class RetryPolicy:
    def __init__(self, settings: RetrySettings, sleep: Callable[[float], None] | None = None) -> None:
        self.settings = settings
        self._sleep = sleep

    def retrying(
        self,
        what: str,
        retry_on: Callable[[BaseException], bool] = is_retryable,
        stop: Callable[[tenacity.RetryCallState], bool] | None = None,
    ) -> tenacity.Retrying:
        """A tenacity loop for custom use (`for attempt in policy.retrying(...): with attempt: ...`).

        `stop` replaces the attempt limit, for callers that retry until a deadline instead."""

        def _log(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s failed (attempt %d), retrying in %.2fs: %s",
                what,
                state.attempt_number,
                state.next_action.sleep if state.next_action else 0.0,
                error,
            )

        kwargs: dict[str, Any] = {}
        if self._sleep is not None:
            kwargs["sleep"] = self._sleep
        return tenacity.Retrying(
            stop=stop or tenacity.stop_after_attempt(self.settings.max_attempts),
            wait=_BackoffWithHint(self.settings.initial_delay_seconds, self.settings.max_delay_seconds),
            retry=tenacity.retry_if_exception(retry_on),
            before_sleep=_log,
            reraise=True,
            **kwargs,
        )

    def call(self, what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, retried on retryable errors; the last error is raised when attempts run out."""
        return self.retrying(what)(fn, *args, **kwargs)
