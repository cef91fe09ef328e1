"""The installed streamsink version, for `streamsink --version` and the User-Agent of every AWS call."""

from __future__ import annotations

import importlib.metadata


def version() -> str:
    """The version pip installed (package metadata); "dev" when run from a tree that was never installed."""
    try:
        return importlib.metadata.version("streamsink")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
