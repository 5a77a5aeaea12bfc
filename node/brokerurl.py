"""Broker URLs: checked before use, and never shown with their passwords.

Kept apart from :mod:`node.transport` so that reading a node's configuration (every
``kpnode`` command does) checks its URLs without loading the AMQP client.
"""

from __future__ import annotations

import errno
import os
import urllib.parse

#: the URL options the AMQP client reads and acts on for the connection kpx makes (aiormq's
#: TLS, login and heartbeat options, and a plain aio_pika.Connection's parameters); it drops
#: any other without a word, so a misspelt ``cafle=`` would leave the broker verified
#: against the system's CAs instead. Not ``reconnect_interval`` or ``fail_fast``: only
#: aio-pika's RobustConnection reads them, and kpx reconnects by itself (node.transport);
#: nor ``timeout``, which aiormq parses and never uses (kpx gives its own connect timeout).
URL_OPTIONS = frozenset({
    "cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl", "auth",
    "heartbeat", "name", "interleave", "happy_eyeballs_delay"})
#: options that only an amqps:// URL uses; those naming a file are checked at connect
TLS_OPTIONS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")
TLS_FILES = ("cafile", "capath", "certfile", "keyfile")


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
    if "{user}" in url or "{password}" in url:
        # A template given where a URL is taken (`registry publish` without
        # --password-file): it would log in as the user '{user}' and be refused.
        return (f"{redact(url)!r} is a template: its {{user}} and {{password}} are filled "
                "in only from a --password-file")
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
    options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if unknown := sorted(set(options) - URL_OPTIONS):
        return (f"{redact(url)!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} (the AMQP client reads only "
                f"{', '.join(sorted(URL_OPTIONS))})")
    if parts.scheme == "amqp" and (tls := [o for o in TLS_OPTIONS if o in options]):
        are = "is a TLS option" if len(tls) == 1 else "are TLS options"
        return (f"{redact(url)!r}: {', '.join(tls)} {are}: the URL must be amqps:// for "
                "them to be used")
    return None


def _missing_tls_files(url: str) -> list[str]:
    """``name path`` for each TLS file option of ``url`` naming nothing on this machine."""
    options = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return [f"{name} {path}" for name in TLS_FILES for path in options.get(name, ())
            if not os.path.exists(path)]


def why_connect_failed(url: str, exc: BaseException) -> str:
    """Why connecting to ``url`` failed, in words an operator can act on."""
    text = str(exc) or type(exc).__name__
    if (isinstance(exc, OSError) and exc.errno == errno.ENOENT
            and (missing := _missing_tls_files(url))):
        # The TLS context's own words name no file.
        return f"no such file: {', '.join(missing)} (a TLS option of the broker URL)"
    if "Connection.OpenOk" in text and "Connection.Close" in text:
        # aiormq's words for a broker closing the connection at 'open vhost'.
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]) or "/"
        text = (f"the broker refused to open virtual host {vhost!r}: it does not exist, or "
                "this user may not use it")
    return text
