# -*- test-case-name: tests.test_dsn -*-
"""
Delivery status notifications: RFC 3464 reports in an RFC 6522 C{multipart/report}, sent by the
rules of RFC 3461 (and RFC 6533 for internationalized addresses).

A notice has three parts: a plain English explanation naming each recipient and the reply that
decided its fate; the machine-readable C{message/delivery-status}; and the original message, in
full (C{message/rfc822}, failure notices when the sender asked for C{RET=FULL} or said nothing,
up to L{RETURN_LIMIT}) or its headers only (C{text/rfc822-headers}). Notices come from
C{MAILER-DAEMON} and are sent with the null sender, and no notice ever goes to the null
sender (L{wanted}): that is what keeps notices from bouncing back and forth.

Composing (L{compose}) is pure; L{read_original} reads the queued message file, once.
"""

from __future__ import annotations

import os
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO, Literal

from mailserver.queue.model import Notify, QueuedRecipient, Ret

RETURN_LIMIT = 1024 * 1024
"""The largest original returned whole; a larger one is returned as headers only."""
HEADER_LIMIT = 256 * 1024
"""The most of an original's header section that is returned."""

Action = Literal["failed", "delayed", "relayed", "delivered"]
Kind = Literal["failure", "delay", "relayed", "delivered"]

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_FIELD_LIMIT = 900  # RFC 5322 §2.1.1: lines of at most 998 octets
_READ_CHUNK = 64 * 1024

_SUBJECTS: dict[Kind, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "relayed": "Relayed Mail Delivery Report",
    "delivered": "Successful Mail Delivery Report",
}


def wanted(sender: str, recipient: QueuedRecipient, kind: Notify) -> bool:
    """
    Whether a notice of C{kind} (FAILURE, DELAY or SUCCESS) about C{recipient} goes to C{sender}.

    Never to the null sender: bounces of bounces would loop (RFC 5321 §4.5.5, RFC 3461 §6.2);
    otherwise as the recipient's NOTIFY asks (none given: FAILURE and DELAY; NEVER: none).
    """
    return sender != "" and recipient.wants(kind)


@dataclass(frozen=True, slots=True)
class Original:
    """What a notice says about the message it reports on."""

    queue_id: str
    sender: str
    """The envelope sender: the notice goes to it."""
    received: float
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    size: int | None = None
    """The message's length in its queue file, which may hold more after it (None: the whole
    file is the message)."""


@dataclass(frozen=True, slots=True)
class Report:
    """What a notice says about one recipient."""

    address: str
    action: Action
    status: str
    """The RFC 3463 status, C{"5.1.1"}."""
    orcpt: str | None = None
    """The RCPT ORCPT= parameter, decoded: C{"rfc822;user@example.org"}."""
    remote_mta: str = ""
    """The host that answered, as logged: C{"mx.example.net[192.0.2.1]"}."""
    diagnostic: str = ""
    """The remote server's reply, C{"550 5.1.1 no such user"}; C{""} when none."""
    detail: str = ""
    """What happened, in words, when it is not (only) the remote reply."""
    will_retry_until: float | None = None
    """For a delay: when the mail server gives up."""


def status_of(code: int, text: str, action: Action) -> str:
    """
    The RFC 3463 status of a reply: its enhanced code when it gives one of the reply's class,
    else the class of the reply code, else the one that fits C{action}.
    """
    m = _ENHANCED.match(text.strip())
    klass = str(code // 100) if 200 <= code < 600 else ""
    if m is not None and (not klass or m.group(1) == klass):
        return m.group(0)
    if klass in ("2", "4", "5"):
        return f"{klass}.0.0"
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")


def read_original(
    path: Path, size: int | None, full: bool, limit: int = RETURN_LIMIT
) -> tuple[bytes, bytes | None]:
    """
    Read the queued message C{path} for a notice, once.

    @param size: the message's length: the file may hold more after it (None: the whole file).
    @param full: the whole message is wanted (when it is at most C{limit} octets).
    @return: its header section (ending with its last CRLF, without the empty line; at most
        L{HEADER_LIMIT} octets) and the whole message, or None when not wanted or too large.
    """
    with open(path, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        if full and size <= limit:
            whole = f.read(size)
            return header_section(whole), whole
        return _read_headers(f, size), None


def _read_headers(f: BinaryIO, size: int) -> bytes:
    buf = b""
    while True:
        head = _complete_header(buf)
        if head is not None:
            return head
        if len(buf) >= HEADER_LIMIT:
            cut = buf[:HEADER_LIMIT].rfind(b"\r\n")
            return buf[: cut + 2] if cut >= 0 else b""
        chunk = f.read(min(_READ_CHUNK, size - len(buf)))
        if not chunk:
            return buf
        buf += chunk


def header_section(data: bytes) -> bytes:
    """
    The header section at the start of message C{data}: up to and including the CRLF before
    the first empty line (all of C{data} when there is none).
    """
    head = _complete_header(data)
    return data if head is None else head


def _complete_header(data: bytes) -> bytes | None:
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else None


def build_notice(
    kind: Kind,
    original: Original,
    reports: Sequence[Report],
    message: Path,
    *,
    hostname: str,
    notice_id: str,
    now: float,
    limit: int = RETURN_LIMIT,
) -> bytes:
    """
    A notice of C{kind} about C{reports}, returning the queued message file C{message} (whole
    or its headers, by the rules of RFC 3461 §4.3: only failure notices return more than the
    headers, and only without C{RET=HDRS}). Blocking: it reads the file.
    """
    full = kind == "failure" and original.ret != "HDRS"
    headers, whole = read_original(message, original.size, full, limit)
    return compose(
        kind,
        original,
        reports,
        headers,
        whole,
        hostname=hostname,
        notice_id=notice_id,
        now=now,
        too_large=full and whole is None,
    )


def compose(
    kind: Kind,
    original: Original,
    reports: Sequence[Report],
    headers: bytes,
    whole: bytes | None,
    *,
    hostname: str,
    notice_id: str,
    now: float,
    too_large: bool = False,
) -> bytes:
    """
    The bytes of a notice (CRLF lines), from the original's C{headers} and, when returned in
    full, C{whole}.

    @param too_large: the whole message was wanted but is too large (say so in the text).
    """
    utf8 = original.smtputf8 or not all(
        _ascii(s) for s in (original.sender, *(r.address for r in reports))
    )
    returned = whole if whole is not None else headers
    if returned and not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    if whole is not None:
        returned_type = "message/global" if utf8 else "message/rfc822"
    else:
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    status_type = "global-delivery-status" if utf8 else "delivery-status"
    human = _human(kind, original, reports, hostname, whole is not None, too_large)
    status = _status_fields(original, reports, hostname, utf8)
    boundary = f"={secrets.token_hex(12)}/{_safe(hostname, False)}"
    eight = not _ascii_bytes(returned) or not _ascii(human) or not _ascii(status)

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_safe(hostname, utf8)}>",
        f"To: <{_safe(original.sender, utf8)}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: <{_safe(notice_id, False)}@{_safe(hostname, False)}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={status_type};",
        f'\tboundary="{boundary}"',
    ]
    if eight:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines += ["", "This is a MIME-encapsulated message.", "", f"--{boundary}"]
    lines += _part_header("text/plain", "utf-8" if not _ascii(human) else "us-ascii", human)
    lines += ["", *human.split("\n"), f"--{boundary}"]
    lines += _part_header(f"message/{status_type}", None, status)
    lines += ["", *status.split("\n"), f"--{boundary}"]
    lines += [f"Content-Type: {returned_type}"]
    if not _ascii_bytes(returned):
        lines.append("Content-Transfer-Encoding: 8bit")
    lines += ["", ""]
    head = "\r\n".join(lines).encode("utf-8")
    return head + returned + f"\r\n--{boundary}--\r\n".encode("ascii")


def _part_header(ctype: str, charset: str | None, text: str) -> list[str]:
    lines = [f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "")]
    if not _ascii(text):
        lines.append("Content-Transfer-Encoding: 8bit")
    return lines


def _human(
    kind: Kind,
    original: Original,
    reports: Sequence[Report],
    hostname: str,
    returned_whole: bool,
    too_large: bool,
) -> str:
    """The plain English first part (LF lines)."""
    paragraphs = [f"This is the mail server at {hostname}."]
    if kind == "failure":
        paragraphs.append(
            "Your message could not be delivered to one or more of its recipients. "
            "The mail server has given up on the addresses below; they will not get it."
        )
    elif kind == "delay":
        until = next((r.will_retry_until for r in reports if r.will_retry_until), None)
        when = f"until {formatdate(until, usegmt=True)}" if until else "for a while longer"
        paragraphs.append(
            "Your message has not yet been delivered to the recipients below. The mail server "
            f"will keep trying {when}; you do not need to send it again."
        )
    elif kind == "delivered":
        paragraphs.append(
            "Your message was delivered to the mailboxes of the recipients below, as you "
            "asked (NOTIFY=SUCCESS)."
        )
    else:
        paragraphs.append(
            "Your message was passed on to the next mail server for the recipients below. "
            "That server does not send delivery notifications, so you will get no further "
            "report about these recipients."
        )
    out = [textwrap.fill(p, 76) for p in paragraphs]
    out.append(
        "\n".join(
            textwrap.fill(
                f"<{r.address}>: {_explain(r)}",
                76,
                subsequent_indent="    ",
                break_long_words=False,
            )
            for r in reports
        )
    )
    if too_large:
        out.append("The message was too large to return whole; its headers are attached.")
    elif returned_whole:
        out.append("Your message is attached.")
    else:
        out.append("The headers of your message are attached.")
    return "\n\n".join(out) + "\n"


def _explain(r: Report) -> str:
    parts = []
    if r.detail:
        parts.append(_clean(r.detail))
    if r.diagnostic:
        who = f"host {_clean(r.remote_mta)}" if r.remote_mta else "the remote server"
        parts.append(f"{who} said: {_clean(r.diagnostic)}")
    return "; ".join(parts) or f"status {r.status}"


def _status_fields(original: Original, reports: Sequence[Report], hostname: str, utf8: bool) -> str:
    """The C{message/delivery-status} content (RFC 3464 §2.2, §2.3), LF lines."""
    fields = []
    if original.envid:
        fields.append(f"Original-Envelope-Id: {_safe(original.envid, utf8)}")
    fields += [
        f"Reporting-MTA: dns; {_safe(hostname, utf8)}",
        f"X-Queue-ID: {_safe(original.queue_id, False)}",
        f"Arrival-Date: {formatdate(original.received, usegmt=True)}",
    ]
    blocks = ["\n".join(fields)]
    for r in reports:
        lines = []
        if r.orcpt:
            kind, sep, addr = r.orcpt.partition(";")
            orcpt = f"{kind.strip()}; {addr.strip()}" if sep else f"rfc822; {r.orcpt}"
            lines.append(f"Original-Recipient: {_safe(orcpt, utf8)}")
        addr_type = "rfc822" if _ascii(r.address) else "utf-8"  # RFC 6533 §3
        lines += [
            f"Final-Recipient: {addr_type}; {_safe(r.address, utf8)}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        mta = _mta_name(r.remote_mta)
        if mta:
            lines.append(f"Remote-MTA: dns; {_safe(mta, utf8)}")
        if r.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {_safe(r.diagnostic, utf8)}")
        if r.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {formatdate(r.will_retry_until, usegmt=True)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _mta_name(host: str) -> str:
    """C{"mx.example.net"} of C{"mx.example.net[192.0.2.1]"}; C{"[192.0.2.1]"} with no name."""
    name, bracket, rest = host.partition("[")
    if name.strip():
        return name.strip()
    return f"[{rest.rstrip(']')}]" if bracket and rest.strip("]") else ""


def _clean(text: str) -> str:
    """One line: control characters (CR, LF: header injection) become spaces."""
    return _CONTROL.sub(" ", text).strip()


def _safe(text: str, utf8: bool) -> str:
    """A field value: one line, bounded, ASCII unless C{utf8} (then raw UTF-8, RFC 6532)."""
    text = _clean(text)[:_FIELD_LIMIT]
    if not utf8 and not _ascii(text):
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text


def _ascii(text: str) -> bool:
    return text.isascii()


def _ascii_bytes(data: bytes) -> bool:
    return data.isascii()
