"""How a message quotes a value a client sent: a short escaped prefix and the size, never the value whole.

Every error a server returns, and every log line it writes, that shows client input goes through
`quote`, so a 7 MB option value or a million-key object costs a reply of a few hundred bytes.
"""
from __future__ import annotations

from typing import Any, Iterable

QUOTE_CHARS = 32  # characters (or bytes) of a text value shown; repr escapes them, so at most ~10x that
QUOTE_NAMES = 5  # names shown from a list of them (unknown options, repeated parts)
_JSON_KINDS = {dict: ("a JSON object", "keys"), list: ("a JSON array", "items"), tuple: ("a JSON array", "items")}


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`value` as a message may show it: repr of at most `limit` characters, then its size when cut."""
    if isinstance(value, (str, bytes, bytearray)):
        shown = repr(value[:limit] if isinstance(value, str) else bytes(value[:limit]))
        unit = "characters" if isinstance(value, str) else "bytes"
        return shown if len(value) <= limit else f"{shown}... ({len(value)} {unit})"
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    kind, unit = _JSON_KINDS.get(type(value), (f"a {type(value).__name__}", "items"))
    size = len(value) if hasattr(value, "__len__") else None
    return kind if size is None else f"{kind} of {size} {unit if size != 1 else unit[:-1]}"


def quote_names(names: Iterable[Any]) -> str:
    """At most QUOTE_NAMES quoted names, then how many there were: "'a', 'b', ... (7 in all)"."""
    names = list(names)
    shown = ", ".join(quote(name) for name in names[:QUOTE_NAMES])
    return shown if len(names) <= QUOTE_NAMES else f"{shown}, ... ({len(names)} in all)"
