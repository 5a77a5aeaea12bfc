"""Broker URLs: checked before use, and never shown with their passwords.

Kept apart from :mod:`node.transport` so that reading a node's configuration (every
``kpnode`` command does) checks its URLs without loading the AMQP client.
"""

from __future__ import annotations

import urllib.parse


def redact(url: str) -> str:
    """The URL without its password, for logs and errors (a URL without a scheme too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def broker_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a broker (with its password masked), or ``None``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # 'Invalid IPv6 URL', a character NFKC turns into '/' ...
        return f"{redact(url)!r} is not a URL: {exc}"
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        return f"{redact(url)!r} is not an amqp:// or amqps:// URL with a host"
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # amqp://user:pa/ss@host/ would go to host "user"; the password must be encoded.
        return (f"{redact(url)!r}: a '/', '?' or '#' in the user name or password must be "
                "percent-encoded (%2F, %3F, %23)")
    if parts.fragment or url.endswith("#"):
        return f"{redact(url)!r}: an AMQP URL has no '#fragment'"
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        return f"{redact(url)!r}: the port must be a number from 0 to 65535"
    return None


def why_connect_failed(url: str, exc: BaseException) -> str:
    """Why connecting to ``url`` failed, in words an operator can act on."""
    text = str(exc) or type(exc).__name__
    if "Connection.OpenOk" in text and "Connection.Close" in text:
        # aiormq's words for a broker closing the connection at 'open vhost'.
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]) or "/"
        text = (f"the broker refused to open virtual host {vhost!r}: it does not exist, or "
                "this user may not use it")
    return text
