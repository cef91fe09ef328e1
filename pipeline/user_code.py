"""The user's own code named in a config (`"package.module:function"`): imported and checked at validation, so
a typo is a config error naming the key, never a failure at the first record."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(reference: str, *, expected: str) -> Callable[..., Any]:
    """Import `"package.module:function"`; a ValueError says what is wrong and how to fix it.

    `expected` describes the function wanted, for the message when the name is not callable.
    """
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise ValueError('must be "package.module:function", e.g. "myapp.masking:mask_email"')
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"module {module_name!r} cannot be imported ({type(exc).__name__}: {exc}); install the package that "
            "holds it or add its directory to PYTHONPATH"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r}; define {expected} there or fix the name")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{attribute!r} is a {type(target).__name__}, not a function; name {expected}")
    function: Callable[..., Any] = target
    return function
