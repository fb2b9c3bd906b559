"""Short forms of long or untrusted text for log lines and status messages."""

from __future__ import annotations

from collections.abc import Sequence

# Most items named in one log line (a failure that concerns thousands of sessions names the first ones).
LISTED_ITEMS = 20
# Most characters of a client-chosen value echoed back in a status message or a log line (session
# ids are at most 64 characters; anything longer is cut, so a huge value cannot bloat an answer).
SHOWN_CHARS = 80


def listing(items: Sequence[str], limit: int = LISTED_ITEMS) -> str:
    """`items` joined with '; ', the first `limit` of them and a count of the rest."""
    text = "; ".join(items[:limit])
    if len(items) > limit:
        text += f"; and {len(items) - limit} more"
    return text


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length said when it is longer."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
