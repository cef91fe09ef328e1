"""`streamsink run --workers N`: N worker processes on one machine, sharing the stream's shards through leases.

One process stays near one core (the GIL): this is how one machine uses all of its cores. The workers are
ordinary `streamsink run` processes with the same configuration, so they split the shards exactly as workers
on different machines do, and a SIGTERM here drains them all. The group stops as one: if a worker exits on its
own (an error), the others are stopped too and its exit code is returned, so the orchestrator that restarts
`streamsink` (systemd, ECS, Kubernetes) sees the failure instead of a group quietly running short.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from pipeline.settings import Settings
from pipeline.state.leases import default_worker_id

log = logging.getLogger("streamsink")

POLL_SECONDS = 0.2


def _die_with_parent() -> None:
    """In the worker, before it runs: a SIGTERM when this process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that no worker is left running without its group; elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def worker_environment(settings: Settings, index: int, base_id: str) -> dict[str, str]:
    """What worker `index` of the group gets on top of this process's environment: its own id, its own metrics
    port (the configured one plus its index), and plain log lines (no live status line on a shared terminal)."""
    env = {"STREAMSINK_LEASE__WORKER_ID": f"{base_id}-{index}"}
    if settings.metrics.port is not None:
        env["STREAMSINK_METRICS__PORT"] = str(settings.metrics.port + index if settings.metrics.port else 0)
    if settings.runtime.log_format == "auto":
        env["STREAMSINK_RUNTIME__LOG_FORMAT"] = "text" if sys.stderr.isatty() else "json"
    return env


def run_workers(config_path: str, settings: Settings, count: int) -> int:
    """Start `count` workers, wait for SIGTERM/SIGINT (forwarded to every worker) or for one to exit."""
    base_id = settings.lease.worker_id or default_worker_id()
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: draining %d worker(s)", signal.Signals(signum).name, count)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    workers = []
    for index in range(count):
        env = {**os.environ, **worker_environment(settings, index, base_id)}
        command = [sys.executable, "-m", "pipeline.cli", "run", "--config", config_path]
        # Its own process group: a Ctrl-C on the terminal reaches this process only, which drains the workers
        # in order instead of every worker at once and this one too.
        workers.append(subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent))
    log.info(
        "started %d worker(s): %s", count, ", ".join(f"{base_id}-{n} (pid {w.pid})" for n, w in enumerate(workers))
    )
    failed: int | None = None
    while not stop.wait(POLL_SECONDS):
        for index, worker in enumerate(workers):
            code = worker.poll()
            if code is not None:
                log.error("worker %s-%d exited with %d: stopping the others", base_id, index, code)
                failed = code or 1
                stop.set()
                break
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    codes = [worker.wait() for worker in workers]
    if failed is not None:
        return failed
    return max(codes, default=0)
