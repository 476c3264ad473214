# -*- test-case-name: tests.test_smtp_address -*-
"""
Parsing of SMTP paths and their parameters (RFC 5321 §4.1.2, RFC 6531 for UTF-8, RFC 3461 for
the DSN parameters and xtext): no I/O.

L{parse_path_argument} takes what follows C{MAIL} / C{RCPT} and returns the address and the
ESMTP parameters, or raises L{Reply} with the code the client should get.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailserver.smtp.codes import (
    C501ParamSyntax,
    C553MailboxNameNotAllowed,
    C555ParamsNotRecognized,
    Reply,
    SeAddrBadDestSyntax,
    SeAddrBadSenderSyntax,
    SeMsgNonASCII,
    SeProtoParams,
    SeProtoSyntax,
)

if TYPE_CHECKING:
    from mailserver.queue.model import Notify, Ret

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3

# RFC 5321 §4.1.2 atext, plus any non-ASCII character (RFC 6531 §3.3 UTF8-non-ascii).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LDH = r"A-Za-z0-9\u0080-\U0010ffff"
_LABEL = rf"(?:[{_LDH}](?:[{_LDH}\-]*[{_LDH}])?)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?")
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")

# codes.py holds only subject.detail; a reply needs the class digit too (RFC 3463 §2), and
# everything refused here is permanent.
_BAD_SENDER = "5." + SeAddrBadSenderSyntax  # 5.1.7
_BAD_DEST = "5." + SeAddrBadDestSyntax  # 5.1.3
_SYNTAX = "5." + SeProtoSyntax  # 5.5.2
_BAD_PARAM = "5." + SeProtoParams  # 5.5.4
_NON_ASCII = "5." + SeMsgNonASCII  # 5.6.7


@dataclass(frozen=True, slots=True)
class Path:
    """
    A parsed C{MAIL FROM} or C{RCPT TO} argument.

    @ivar address: C{local@domain} with the domain in lower case, or C{""} for the null path,
        or C{"postmaster"} for the bare C{<Postmaster>} recipient (RFC 5321 §4.1.1.3).
    @ivar params: ESMTP parameters, names upper case, C{None} for a parameter without a value.
    """

    address: str
    params: dict[str, str | None]


def split_address(address: str) -> tuple[str, str]:
    """Split C{local@domain} at its last C{@}."""
    local, _, domain = address.rpartition("@")
    return local, domain


def parse_path_argument(arg: str, keyword: str, sender: bool) -> Path:
    """
    Parse C{FROM:<a@b> PARAMS} (C{keyword} is C{"FROM"}) or C{TO:<a@b> PARAMS}.

    A space between the colon and C{<} is accepted: many clients send it.

    @raise Reply: C{501} for bad syntax, C{553} for an address we cannot take.
    """
    enhanced = _BAD_SENDER if sender else _BAD_DEST
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise Reply(
            C501ParamSyntax,
            _SYNTAX,
            f"Syntax: {'MAIL FROM' if sender else 'RCPT TO'}:<address>",
        )
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise Reply(C501ParamSyntax, enhanced, "Address must be enclosed in <>")
    end = _closing_bracket(rest)
    if end < 0:
        raise Reply(C501ParamSyntax, enhanced, "Unbalanced <> in address")
    inner = rest[1:end]
    params = parse_params(rest[end + 1 :])
    if len(inner) > MAX_PATH:
        raise Reply(C501ParamSyntax, enhanced, "Path too long")
    inner = _SOURCE_ROUTE.sub("", inner)  # RFC 5321 §4.1.1.3: source routes SHOULD be ignored
    if inner == "":
        if not sender:
            raise Reply(C501ParamSyntax, enhanced, "Null recipient not allowed")
        return Path("", params)
    if not sender and inner.lower() == "postmaster":
        return Path("postmaster", params)
    return Path(parse_mailbox(inner, enhanced), params)


def _closing_bracket(text: str) -> int:
    """Index of the C{>} that closes the path, skipping quoted strings; -1 if none."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_mailbox(text: str, enhanced: str = _BAD_DEST) -> str:
    """
    Check C{local@domain} syntax and return it with the domain in lower case.

    @raise Reply: C{501} when it is not a mailbox.
    """
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise Reply(C501ParamSyntax, enhanced, "Address must be local@domain")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise Reply(C501ParamSyntax, enhanced, "Bad local part syntax")
    if not (_DOMAIN.fullmatch(domain) or _ADDRESS_LITERAL.fullmatch(domain)):
        raise Reply(C501ParamSyntax, enhanced, "Bad domain syntax")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise Reply(C501ParamSyntax, enhanced, "Local part too long")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise Reply(C501ParamSyntax, enhanced, "Domain too long")
    return f"{local}@{domain.lower()}"


def parse_params(text: str) -> dict[str, str | None]:
    """
    Parse ESMTP parameters (RFC 5321 §4.1.2 C{Mail-parameters}).

    @raise Reply: C{501} on bad syntax or a repeated parameter.
    """
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        m = _PARAM.fullmatch(word)
        if m is None:
            raise Reply(C501ParamSyntax, _SYNTAX, "Bad parameter syntax")
        name = m.group(1).upper()
        if name in params:
            raise Reply(C501ParamSyntax, _SYNTAX, f"Duplicate parameter {name}")
        params[name] = m.group(2)
    return params


def require_ascii(address: str, smtputf8: bool) -> None:
    """
    Refuse a non-ASCII address unless the transaction declared SMTPUTF8.

    @raise Reply: C{553 5.6.7} (RFC 6531 §3.7.5).
    """
    if not smtputf8 and not address.isascii():
        raise Reply(C553MailboxNameNotAllowed, _NON_ASCII, "Non-ASCII address requires SMTPUTF8")


def unknown_parameter(name: str) -> Reply:
    """The reply for a parameter we do not implement (RFC 5321 §4.1.1.11: 555)."""
    return Reply(C555ParamsNotRecognized, _BAD_PARAM, f"Parameter {name} not supported")


# -- DSN parameters (RFC 3461) --------------------------------------------------------------------

MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # an atom (RFC 3461 §4.2)
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_NOTIFY: dict[str, Notify] = {
    "NEVER": "NEVER",
    "SUCCESS": "SUCCESS",
    "FAILURE": "FAILURE",
    "DELAY": "DELAY",
}
_RET: dict[str, Ret] = {"FULL": "FULL", "HDRS": "HDRS"}


def _bad(text: str) -> Reply:
    return Reply(C501ParamSyntax, _BAD_PARAM, text)


def xtext_decode(text: str) -> str:
    """
    Decode RFC 3461 §4 xtext: C{+XX} (two hex digits) is the character XX; C{+} and C{=}
    appear only so encoded. Lower-case hex digits are accepted too.

    @raise ValueError: C{text} is not xtext.
    """
    if not _XTEXT.fullmatch(text):
        raise ValueError("not xtext")
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Encode printable ASCII as xtext: C{+}, C{=} and anything outside C{!}..C{~} as C{+XX}."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else f"+{ord(ch):02X}" for ch in text)


def parse_ret(value: str | None) -> Ret:
    """
    MAIL C{RET=FULL|HDRS} (RFC 3461 §4.3), any case.

    @raise Reply: C{501 5.5.4} for anything else.
    """
    ret = _RET.get((value or "").upper())
    if ret is None:
        raise _bad("RET must be FULL or HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    """
    MAIL C{ENVID=xtext} (RFC 3461 §4.4): at most 100 characters, printable ASCII once decoded.

    @return: the decoded envelope id.
    @raise Reply: C{501 5.5.4} when it is not that.
    """
    if not value or len(value) > MAX_ENVID:
        raise _bad("ENVID must be 1 to 100 characters of xtext")
    try:
        envid = xtext_decode(value)
    except ValueError:
        raise _bad("ENVID is not valid xtext")
    if not _PRINTABLE.fullmatch(envid):
        raise _bad("ENVID must be printable ASCII")
    return envid


def parse_notify(value: str | None) -> frozenset[Notify]:
    """
    RCPT C{NOTIFY=NEVER} or C{NOTIFY=} a list of C{SUCCESS}, C{FAILURE}, C{DELAY}
    (RFC 3461 §4.1), any case.

    @raise Reply: C{501 5.5.4} for an empty value, another keyword, or NEVER with others.
    """
    words = (value or "").upper().split(",")
    kinds = [_NOTIFY.get(word) for word in words]
    found = frozenset(kind for kind in kinds if kind is not None)
    if None in kinds or ("NEVER" in found and len(found) > 1):
        raise _bad("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY separated by commas")
    return found


def parse_orcpt(value: str | None) -> str:
    """
    RCPT C{ORCPT=addr-type;xtext} (RFC 3461 §4.2).

    @return: C{addr-type;address}, the type lower case and the address decoded from xtext,
        which must then be printable ASCII. For the C{utf-8} type (RFC 6533) the address is
        kept in its C{utf-8-addr-xtext} form, as sent.
    @raise Reply: C{501 5.5.4} when it is not that.
    """
    if not value or len(value) > MAX_ORCPT:
        raise _bad("ORCPT must be addr-type;xtext of at most 500 characters")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not encoded or not _ADDR_TYPE.fullmatch(addr_type):
        raise _bad("ORCPT must be addr-type;xtext")
    addr_type = addr_type.lower()
    if addr_type == "utf-8":
        return f"{addr_type};{encoded}"
    try:
        address = xtext_decode(encoded)
    except ValueError:
        raise _bad("ORCPT address is not valid xtext")
    if not _PRINTABLE.fullmatch(address):
        raise _bad("ORCPT address must be printable ASCII")
    return f"{addr_type};{address}"
