# -*- test-case-name: tests.test_smtp_server -*-
"""
SMTP reply codes and enhanced status codes (RFC 5321 §4.2, RFC 3463), and L{Reply}: the one
exception whose text may reach the wire.
"""

from __future__ import annotations


class Reply(Exception):
    """
    A reply to send to the client: raised by command handlers to refuse a command.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 enhanced status code (C{"5.1.1"}), or C{""} for none.
    @ivar text: human-readable text, ASCII, no CR or LF.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def line(self) -> bytes:
        """The reply as one CRLF-terminated line."""
        return format_reply(self.code, self.enhanced, self.text)

    @property
    def temporary(self) -> bool:
        """Whether the client may try again later (4xx)."""
        return self.code // 100 == 4


def format_reply(code: int, enhanced: str, text: str) -> bytes:
    """One reply line, with the enhanced code when there is one (RFC 2034 §3)."""
    if enhanced:
        return b"%d %s %s\r\n" % (code, enhanced.encode("ascii"), text.encode("ascii", "replace"))
    return b"%d %s\r\n" % (code, text.encode("ascii", "replace"))


def format_multiline(code: int, lines: list[str]) -> bytes:
    """A multi-line reply: C{250-first}, ..., C{250 last} (RFC 5321 §4.2.1)."""
    out = []
    for i, text in enumerate(lines):
        sep = b" " if i == len(lines) - 1 else b"-"
        out.append(b"%d%s%s\r\n" % (code, sep, text.encode("ascii", "replace")))
    return b"".join(out)


# Reply codes, RFC 5321 §4.2.2/§4.2.3.
C211Status = 211
C214Help = 214
C220Ready = 220
C221Closing = 221
C250OK = 250
C252CannotVerify = 252
C354StartInput = 354
C421ServiceUnavailable = 421
C450MailboxUnavailable = 450
C451LocalError = 451
C452InsufficientStorage = 452  # also "too many recipients", RFC 5321 §4.5.3.1.10
C454TLSUnavailable = 454
C500SyntaxError = 500
C501ParamSyntax = 501
C502NotImplemented = 502
C503BadSequence = 503
C504ParamNotImplemented = 504
C550MailboxUnavailable = 550
C552ExceededStorage = 552
C553MailboxNameNotAllowed = 553
C554TransactionFailed = 554
C555ParamsNotRecognized = 555

# Enhanced status codes, RFC 3463 and the IANA registry.
SeOther = "0.0"
SeAddrBadDest = "1.1"  # bad destination mailbox address
SeAddrBadDestSyntax = "1.3"
SeAddrBadSenderSyntax = "1.7"
SeAddrOK = "1.5"  # destination address valid
SeAddrSenderOK = "1.0"
SeMsgTooBig = "3.4"
SeMailboxFull = "2.2"
SeSysOther = "3.0"
SeSysNotAccepting = "3.2"
SeNetCongestion = "4.5"
SeProtoOther = "5.0"
SeProtoSyntax = "5.2"
SeProtoBadSequence = "5.1"
SeProtoTooManyRcpts = "5.3"
SeProtoParams = "5.4"
SeMediaOther = "6.0"  # used for bare CR/LF in a message, see data.py
SeMsgNonASCII = "6.7"  # RFC 6531 §3.7.5: non-ASCII addresses need SMTPUTF8
SeSecOther = "7.0"
SeSecRelayDenied = "7.1"
SeSecTLSRequired = "7.0"
