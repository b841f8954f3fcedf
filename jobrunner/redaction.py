"""Keeping database passwords out of everything jobrunner prints or logs.

Two layers. Known secrets: every form of the password of each database URL
jobrunner was given (as typed, percent-decoded, percent-encoded) is
remembered and replaced wherever it appears, whatever the characters in it
(``/``, spaces, ``@``, ``#``, quotes). Unknown URLs: anything shaped like
``scheme://user:password@`` loses its password, up to the last ``@``.

This module imports nothing heavy: the CLI uses it before SQLAlchemy loads.
"""

from __future__ import annotations

import re
import threading
from typing import IO, Any
from urllib.parse import quote, unquote

MASK = "***"
# A secret shorter than this is not searched for as a bare substring (a
# one-letter password would mangle every message); URLs still hide it.
MIN_SECRET = 3

_lock = threading.Lock()
_secrets: list[str] = []

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+_.-]*://[^/@:\s]*:)\S*@")
_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&\s]*")


def url_secrets(url: str) -> set[str]:
    """Every spelling of the password in ``url``, as typed or parsed."""
    found: set[str] = set()
    _, sep, rest = url.partition("://")
    if not sep:
        return found
    rest = rest.split("?", 1)[0]
    if "@" in rest:
        # The authority ends at the LAST "@": an unencoded "@" in a password
        # would otherwise leave its tail in what looks like the host.
        userinfo = rest.rsplit("@", 1)[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    for match in _PASSWORD_PARAM.finditer(url):
        found.add(match.group(0).split("=", 1)[1])
    forms = set()
    for secret in found:
        plain = unquote(secret)
        # as typed, decoded, fully encoded, and as SQLAlchemy renders a URL
        forms |= {secret, plain, quote(plain, safe=""), quote(plain, safe=" +")}
    return {s for s in forms if s}


def register(url: str) -> None:
    """Remember the password of a database URL, so that it is never shown."""
    with _lock:
        for secret in url_secrets(url):
            if secret not in _secrets:
                _secrets.append(secret)
        _secrets.sort(key=len, reverse=True)  # longest first: no partial masks


def redact(text: str) -> str:
    """``text`` with every known password, and any password in a URL, masked."""
    if not text:
        return text
    for secret in _secrets:
        if len(secret) >= MIN_SECRET and secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    return _PASSWORD_PARAM.sub(r"\1" + MASK, text)


class RedactingStream:
    """A text stream that masks secrets in everything written to it: the last
    line of defence for tracebacks and anything else printed."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
