"""One canonical form of a request path, decided once, before routing.

A provider decodes `%73` to `s` and resolves `.`/`..` and `//` before it routes; if the
proxy matched endpoints on the raw path, `/v1/chat/completion%73` would reach the
provider's chat endpoint unmetered. So the path is decoded and normalised here, endpoints
are matched on that form, and exactly that form goes upstream. What cannot be normalised
without guessing (an encoded `/` or `\\`, a `..` above the provider's root) is refused.
"""

from __future__ import annotations

import re

# Characters a path segment may hold unencoded (RFC 3986 pchar, less "%").
_PCHAR = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_AMBIGUOUS = frozenset({"/", "\\"})


class AmbiguousPath(ValueError):
    """A path the proxy cannot put in one canonical form without guessing."""


def _decode(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    if char in _AMBIGUOUS:
        raise AmbiguousPath(f"an encoded {char!r} ({match.group(0)}) in the path")
    # Safe characters are decoded; the rest (?, #, %, spaces, bytes >= 0x80) stay escaped,
    # with upper-case hex, so every spelling of one path has one form.
    return char if char in _PCHAR else match.group(0).upper()


def canonical(raw: str) -> str:
    """The canonical form of a raw (still encoded) absolute path, without its query.

    Raises AmbiguousPath for a path with an encoded separator, a raw `\\`, or a `..`
    that climbs above `/`.
    """
    if "\\" in raw:
        raise AmbiguousPath("a '\\' in the path")
    decoded = _ESCAPE.sub(_decode, raw)
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise AmbiguousPath("'..' climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    trailing = "/" if decoded.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing
