"""Setting values as integrations hand them over (ints, or strings from a command line, a
JSON document or the environment): sizes in binary units and boolean words. MaruConfig's
environment overrides and every framework adapter read them here, so ``"4G"`` and ``"on"``
mean the same everywhere."""

from __future__ import annotations

import re

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def bool_word(text: str) -> bool | None:
    """True or False for a word of :data:`TRUE` or :data:`FALSE` (any case, spaces around
    ignored); None for any other text."""
    v = text.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    return None


def parse_size(value: object, name: str, *, integral_floats: bool = False) -> int:
    """Bytes from an int or a string such as ``"4G"``, ``"512MiB"``, ``"1.5g"``, ``"65536"``
    (and from a float without a fraction when `integral_floats`); ValueError names `name`."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size, not a bool")
    if isinstance(value, int):
        n = value
    elif integral_floats and isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(f"{name}={value!r} is not a size (bytes, or e.g. 4G, 512M, 64KiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"{name} must be an int or a size string, not {type(value).__name__}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n
