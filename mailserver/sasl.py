# -*- test-case-name: tests.test_sasl -*-
"""
Server-side SASL mechanisms (RFC 4422) as small state machines: PLAIN (RFC 4616), LOGIN (the
de-facto C{Username:}/C{Password:} exchange) and SCRAM-SHA-256 (RFC 5802, RFC 7677).

No I/O and no protocol: a mechanism is fed the client's responses, already base64-decoded, and
answers a L{Challenge} (send it, wait for the next response), a L{Success} or a L{Failure}.
PLAIN and LOGIN only collect a user name and a password, which the caller checks (with its
throttling); SCRAM checks the client's proof itself, against the credentials its C{lookup}
gives for the user name, and its L{Success} carries the server's final message (C{v=...}).

SASLprep (RFC 4013): a SCRAM client prepares the password with SASLprep (mostly NFKC) before
it derives its keys, so the stored credentials are derived from L{saslprep} of the password
too. A password that SASLprep refuses (control characters, for instance) is used as it is, as
PostgreSQL does; a client that refuses such a password can still log in with PLAIN. User
names are not prepared here: the caller maps them to accounts by its own rules (the directory
folds case and applies NFC).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

__all__ = [
    "MECHANISMS",
    "SCRAM_ITERATIONS",
    "Challenge",
    "Failure",
    "Login",
    "Mechanism",
    "Plain",
    "ScramCredentials",
    "ScramSHA256",
    "Step",
    "Success",
    "new_mechanism",
    "saslprep",
    "scram_credentials",
]

SCRAM_ITERATIONS = 4096
"""PBKDF2 iterations of new SCRAM-SHA-256 credentials: RFC 7677's minimum, which clients
expect (some refuse fewer, and more only costs every client at every login)."""

SALT_SIZE = 16

MECHANISMS = ("PLAIN", "LOGIN", "SCRAM-SHA-256")
"""The mechanisms this module implements, in the order they are advertised."""

FailureKind = Literal["malformed", "refused", "credentials"]


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send C{data} to the client and feed its response to the mechanism."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Success:
    """
    The exchange is over.

    @ivar username: the authentication identity as the client sent it.
    @ivar password: for PLAIN and LOGIN, the password the caller must still check; C{None} for
        SCRAM (the proof was checked).
    @ivar data: additional data for the client with the success (SCRAM's C{v=...}), or C{None}.
    """

    username: str
    password: str | None = None
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """
    The exchange failed.

    @ivar kind: C{"malformed"}: the client broke the mechanism's syntax; C{"refused"}: a
        well-formed request we do not grant (another authorization identity, channel
        binding); C{"credentials"}: the proof was wrong (a guess: count it as a failed login
        of C{username}).
    @ivar reason: for the log, never secret.
    """

    kind: FailureKind
    reason: str
    username: str | None = None


Step = Challenge | Success | Failure


class Mechanism(Protocol):
    """One exchange of a server-side mechanism."""

    name: str

    def respond(self, response: bytes | None) -> Step:
        """
        Take the client's next response.

        @param response: the decoded response; C{None} for "no initial response" (the first
            call only, when the client's command carried none).
        """
        ...


_MALFORMED_DONE = Failure("malformed", "exchange already finished")


class Plain:
    """PLAIN (RFC 4616): C{authzid NUL authcid NUL passwd}, UTF-8, in one response."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._done = False

    def respond(self, response: bytes | None) -> Step:
        if self._done:
            return _MALFORMED_DONE
        if response is None:
            return Challenge(b"")
        self._done = True
        parts = response.split(b"\x00")
        if len(parts) != 3:
            return Failure("malformed", "PLAIN needs authzid NUL authcid NUL password")
        try:
            authzid, authcid, password = (part.decode("utf-8") for part in parts)
        except UnicodeDecodeError:
            return Failure("malformed", "PLAIN response is not UTF-8")
        if not authcid:
            return Failure("malformed", "empty user name")
        if authzid and authzid != authcid:
            return Failure("refused", "authorization identity differs from the user")
        return Success(authcid, password)


class Login:
    """LOGIN: the server asks C{Username:} then C{Password:}; an initial response is the name."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None
        self._done = False

    def respond(self, response: bytes | None) -> Step:
        if self._done:
            return _MALFORMED_DONE
        if response is None:
            return Challenge(b"Username:")
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            self._done = True
            return Failure("malformed", "LOGIN response is not UTF-8")
        if self._username is None:
            self._username = text
            return Challenge(b"Password:")
        self._done = True
        return Success(self._username, text)


class ScramCredentials(NamedTuple):
    """What the server keeps for SCRAM-SHA-256 (RFC 5802 §3): never the password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def saslprep(text: str) -> str:
    """
    SASLprep (RFC 4013) of a query string: map, NFKC, refuse prohibited characters and bad
    bidirectional text. Unassigned code points are let through (query strings allow them).

    @raise ValueError: C{text} has a prohibited character or mixes directions wrongly.
    """
    if text.isascii() and text.isprintable():
        return text  # the usual password: SASLprep leaves it alone
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    for ch in prepared:
        if _prohibited(ch):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
    _check_bidi(prepared)
    return prepared


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
    )


def _check_bidi(text: str) -> None:
    """RFC 3454 §6: right-to-left text must not contain left-to-right characters, and must
    start and end with a right-to-left character."""
    if not any(stringprep.in_table_d1(ch) for ch in text):
        return
    if any(stringprep.in_table_d2(ch) for ch in text):
        raise ValueError("mixed bidirectional text")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise ValueError("right-to-left text must start and end right-to-left")


def _normalized_password(password: str) -> bytes:
    """The octets SCRAM derives keys from: SASLprep of the password, or the password itself
    when SASLprep refuses it."""
    try:
        prepared = saslprep(password)
    except ValueError:
        prepared = password
    return prepared.encode("utf-8", "surrogatepass")


def scram_credentials(
    password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> ScramCredentials:
    """
    Derive the SCRAM-SHA-256 credentials of C{password} (RFC 5802 §3).

    @param salt: a new random one (L{SALT_SIZE} octets) when not given.
    """
    if salt is None:
        salt = secrets.token_bytes(SALT_SIZE)
    salted = hashlib.pbkdf2_hmac("sha256", _normalized_password(password), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return ScramCredentials(
        salt,
        iterations,
        hashlib.sha256(client_key).digest(),
        hmac.digest(salted, b"Server Key", "sha256"),
    )


def _decode_saslname(text: str) -> str | None:
    """RFC 5802 C{saslname}: C{=2C} is a comma, C{=3D} an equals sign; any other C{=} is an
    error (C{None})."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "=":
            code = text[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _printable_nonce(nonce: str) -> bool:
    return bool(nonce) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in nonce)


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


class ScramSHA256:
    """
    SCRAM-SHA-256 without channel binding (RFC 5802, RFC 7677).

    The GS2 header must be C{n,,} or C{y,,} (the client could bind but thinks we cannot:
    right, we advertise no C{-PLUS} variant), optionally with C{a=} naming the user itself;
    C{p=} (channel binding) is refused. The server's nonce part is random (L{secrets}).
    """

    name = "SCRAM-SHA-256"

    def __init__(
        self,
        lookup: Callable[[str], ScramCredentials],
        nonce_suffix: str | None = None,
    ) -> None:
        """
        @param lookup: the credentials of a user name (as the client sent it, saslname
            decoded); for an unknown user it must answer a deterministic fake, so that the
            answer does not tell who exists.
        @param nonce_suffix: the server's part of the nonce (tests give RFC 7677's); printable
            ASCII without commas.
        """
        self._lookup = lookup
        self._server_nonce = nonce_suffix if nonce_suffix is not None else secrets.token_urlsafe(24)
        if not _printable_nonce(self._server_nonce):
            raise ValueError("the nonce must be printable ASCII without commas")
        self._state = 0  # 0: wants client-first, 1: wants client-final, 2: done
        self._gs2_header = ""
        self._username = ""
        self._nonce = ""
        self._first_bare = ""
        self._server_first = ""
        self._credentials: ScramCredentials | None = None

    def respond(self, response: bytes | None) -> Step:
        if self._state == 2:
            return _MALFORMED_DONE
        if response is None:
            if self._state == 0:
                return Challenge(b"")
            return self._fail("malformed", "missing client-final-message")
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return self._fail("malformed", "not UTF-8")
        if self._state == 0:
            return self._client_first(text)
        return self._client_final(text)

    def _fail(self, kind: FailureKind, reason: str) -> Failure:
        self._state = 2
        username = self._username if kind == "credentials" else None
        return Failure(kind, reason, username)

    def _client_first(self, text: str) -> Step:
        parts = text.split(",", 2)
        if len(parts) != 3:
            return self._fail("malformed", "client-first-message needs a GS2 header")
        flag, authzid, bare = parts
        if flag.startswith("p="):
            return self._fail("refused", "channel binding is not supported")
        if flag not in ("n", "y"):
            return self._fail("malformed", "bad GS2 channel binding flag")
        attributes = bare.split(",")
        if attributes[0].startswith("m="):
            return self._fail("refused", "mandatory extension not supported")
        if len(attributes) < 2 or not attributes[0].startswith("n="):
            return self._fail("malformed", "client-first-message needs n= and r=")
        if not attributes[1].startswith("r="):
            return self._fail("malformed", "client-first-message needs r=")
        username = _decode_saslname(attributes[0][2:])
        nonce = attributes[1][2:]
        if not username or not _printable_nonce(nonce):
            return self._fail("malformed", "bad user name or nonce")
        if authzid:
            wanted = _decode_saslname(authzid[2:]) if authzid.startswith("a=") else None
            if wanted is None:
                return self._fail("malformed", "bad authzid")
            if wanted != username:
                return self._fail("refused", "authorization identity differs from the user")
        self._gs2_header = f"{flag},{authzid},"
        self._username = username
        self._nonce = nonce + self._server_nonce
        self._first_bare = bare
        credentials = self._lookup(username)
        self._credentials = credentials
        salt = base64.b64encode(credentials.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={credentials.iterations}"
        self._state = 1
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, text: str) -> Step:
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            return self._fail("malformed", "client-final-message needs p=")
        attributes = without_proof.split(",")
        if len(attributes) < 2 or not attributes[0].startswith("c="):
            return self._fail("malformed", "client-final-message needs c= and r=")
        if not attributes[1].startswith("r="):
            return self._fail("malformed", "client-final-message needs r=")
        binding = _b64decode(attributes[0][2:])
        proof = _b64decode(proof_text)
        if binding is None or proof is None or len(proof) != hashlib.sha256().digest_size:
            return self._fail("malformed", "bad base64 in c= or p=")
        if binding != self._gs2_header.encode("utf-8"):
            return self._fail("refused", "channel binding data does not match the GS2 header")
        if attributes[1][2:] != self._nonce:
            return self._fail("refused", "nonce mismatch")
        return self._verify(without_proof, proof)

    def _verify(self, without_proof: str, proof: bytes) -> Step:
        credentials = self._credentials
        assert credentials is not None
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(credentials.stored_key, auth_message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), credentials.stored_key):
            return self._fail("credentials", "wrong proof")
        self._state = 2
        verifier = hmac.digest(credentials.server_key, auth_message, "sha256")
        return Success(self._username, None, b"v=" + base64.b64encode(verifier))


def new_mechanism(
    name: str, scram_lookup: Callable[[str], ScramCredentials] | None = None
) -> Mechanism | None:
    """
    A fresh exchange of mechanism C{name} (case-insensitive), or C{None} when it is not one
    of L{MECHANISMS} (or is SCRAM and no C{scram_lookup} is given).
    """
    upper = name.upper()
    if upper == "PLAIN":
        return Plain()
    if upper == "LOGIN":
        return Login()
    if upper == "SCRAM-SHA-256" and scram_lookup is not None:
        return ScramSHA256(scram_lookup)
    return None
