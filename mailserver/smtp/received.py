# -*- test-case-name: tests.test_smtp_server -*-
"""The C{Received:} trace header (RFC 5321 §4.4), with RFC 3848 / RFC 6531 protocol names."""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def protocol_name(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """C{SMTP}, C{ESMTP}, C{ESMTPS}, C{ESMTPSA}, C{UTF8SMTPS}... (RFC 3848, RFC 6531 §3.7.3)."""
    if not esmtp:
        return "SMTP"
    name = (
        ("UTF8SMTP" if smtputf8 else "ESMTP")
        + ("S" if tls else "")
        + ("A" if authenticated else "")
    )
    return name


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    message_id: str,
    recipient: str | None,
    now: float,
) -> bytes:
    """
    One C{Received:} field, folded, CRLF-terminated.

    @param helo: what the client said in HELO/EHLO; shown sanitised and cut to 100 characters.
    @param recipient: named in a C{for} clause only when the message has one recipient, so a
        copy never tells one recipient who the others were.
    @param now: POSIX time of acceptance.
    """
    helo = _UNSAFE.sub("?", helo)[:100] or "unknown"
    date = email.utils.format_datetime(datetime.fromtimestamp(now, UTC).astimezone())
    lines = [
        f"Received: from {helo} ([{peer_ip}])",
        f"\tby {hostname} (mailserver) with {protocol} id {message_id}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
