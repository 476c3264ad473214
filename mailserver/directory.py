# -*- test-case-name: tests.test_directory -*-
"""
The directory: domains, accounts and aliases, in one SQLite database.

The server process answers look-ups (L{SQLiteDirectory.is_local_domain},
L{SQLiteDirectory.resolve}) while the admin CLI, another process, changes the same file. SQLite
in WAL mode lets both work at once: every look-up starts a fresh read transaction, so it sees
the newest committed state and changes apply without a restart.

Addresses are stored as C{local@domain}, both parts lower case (local parts are matched
case-insensitively). A catch-all alias has the source C{@domain}.

Passwords are kept as an argon2id hash (PLAIN and LOGIN logins) and, from schema 2 on, as
SCRAM-SHA-256 credentials (salt, iteration count, StoredKey, ServerKey: never the password) in
PostgreSQL's text form C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}. Accounts
made before schema 2 have none until their next password change: SCRAM fails for them, PLAIN
works.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from zope.interface import implementer

from mailserver.interfaces import IDirectory
from mailserver.sasl import SALT_SIZE, SCRAM_ITERATIONS, ScramCredentials, scram_credentials

SCHEMA_VERSION = 2
"""The C{PRAGMA user_version} of the schema this module creates and reads."""
RECHECK = 0.5
"""Seconds a running server answers look-ups from its cache without asking SQLite whether
another process (the CLI) changed the database; the CLI's changing commands wait this long
before they return when a server runs, so what they did applies when they are done."""
_CACHE_SIZE = 10_000  # look-up results kept; the cache is emptied when full
VERIFIED_TTL = 900.0
"""Seconds a successful password check is remembered (Dovecot's auth cache does the same)."""
_V = TypeVar("_V")

MAX_ALIAS_DEPTH = 10
"""How many aliases deep L{SQLiteDirectory.resolve} follows a chain before giving up."""

_SCHEMA = """
CREATE TABLE domains (
    name TEXT PRIMARY KEY NOT NULL
);
CREATE TABLE users (
    address TEXT PRIMARY KEY NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    password_hash TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX users_domain ON users(domain);
CREATE TABLE aliases (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (source, target)
);
"""
"""Schema 1, which every database starts from; L{_MIGRATIONS} take it to L{SCHEMA_VERSION}."""

_SCHEMA_2 = """
ALTER TABLE users ADD COLUMN scram TEXT;
CREATE TABLE senders (
    account TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (account, address)
);
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
)
"""
"""Schema 1 to 2: SCRAM credentials of users, extra sender addresses, and a secret key."""

_FAKE_KEY = "scram_fake_key"
"""The C{meta} row holding the key of the fake SCRAM credentials of unknown users: kept in the
database so that the fake answer for a name stays the same across restarts, as a real one
does."""
_SCRAM_PREFIX = "SCRAM-SHA-256$"

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# Categories refused in a local part: control characters (Cc), invisible format characters
# (Cf, which make look-alike accounts), surrogates (Cs, not encodable) and separators (Z*).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})


class DirectoryError(Exception):
    """
    A directory operation was refused; C{str(error)} is a message for a human, such as
    C{"domain example.org does not exist"}.
    """


def normalize_domain(name: str) -> str:
    """
    Check a domain name and return it lower case.

    @param name: letters, digits and hyphens in dot-separated labels, no trailing dot
        (internationalized names in their C{xn--} form). A single label such as C{localhost}
        is allowed.
    @return: C{name} stripped and lower case.
    @raise DirectoryError: C{name} is not a domain name.
    """
    domain = name.strip().lower()
    if not domain:
        raise DirectoryError("empty domain name")
    if domain.endswith("."):
        raise DirectoryError(f"domain {domain} must not end with a dot")
    if not domain.isascii():
        raise DirectoryError(f"domain {domain} is not ASCII: use its xn-- form")
    if len(domain) > 253 or not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise DirectoryError(f"{domain} is not a valid domain name")
    return domain


def _check_local_part(local: str, address: str) -> None:
    """
    Refuse local parts that cannot be an account: the local part names a mailbox directory on
    disk, so path separators, NUL and leading dots (C{.}, C{..}, hidden files) are out.

    @raise DirectoryError: C{local} is not acceptable.
    """
    if not local:
        raise DirectoryError(f"{address}: empty local part")
    try:
        size = len(local.encode("utf-8"))
    except UnicodeEncodeError:
        raise DirectoryError(f"{address}: the local part is not valid Unicode")
    if size > 64:
        raise DirectoryError(f"{address}: the local part is longer than 64 octets")
    if local.startswith("."):
        raise DirectoryError(f"{address}: the local part must not start with a dot")
    if "/" in local:
        raise DirectoryError(f"{address}: the local part must not contain a slash")
    for ch in local:
        if ch.isspace() or unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise DirectoryError(
                f"{address!r}: the local part must not contain spaces or control characters"
            )


def normalize_address(address: str) -> str:
    """
    Check an address and return it in the form the directory stores.

    @param address: C{local@domain}; the local part may be UTF-8 (SMTPUTF8).
    @return: C{address} stripped, local part and domain lower case.
    @raise DirectoryError: C{address} is not acceptable, with the reason.
    """
    address = address.strip()
    if not address:
        raise DirectoryError("empty address")
    if address.count("@") != 1:
        raise DirectoryError(f"{address}: an address needs exactly one @")
    local, domain = address.split("@")
    # NFC: the same characters typed on different systems must name the same account.
    local = unicodedata.normalize("NFC", local).lower()
    _check_local_part(local, address)
    return f"{local}@{normalize_domain(domain)}"


def normalize_alias_source(source: str) -> str:
    """
    Check an alias source: an address, or C{@domain} for a catch-all.

    @raise DirectoryError: C{source} is neither.
    """
    source = source.strip()
    if source.startswith("@") and source.count("@") == 1:
        return "@" + normalize_domain(source[1:])
    return normalize_address(source)


def _domain_of(address: str) -> str:
    """The domain of a normalized address or alias source."""
    return address.rpartition("@")[2]


def _local_of(address: str) -> str:
    """The local part of a normalized address."""
    return address.rpartition("@")[0]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _dedupe(addresses: Iterable[str]) -> list[str]:
    """C{addresses} without repeats, first occurrence kept."""
    return list(dict.fromkeys(addresses))


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular}" if n == 1 else f"{n} {plural}"


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run C{;}-separated statements in the open transaction (C{executescript} would COMMIT
    it first)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    _run_script(db, _SCHEMA_2)
    db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (_FAKE_KEY, secrets.token_bytes(32)))


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_1_to_2}
"""Version N to N+1, run in the transaction that sets C{user_version} to N+1."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _format_scram(credentials: ScramCredentials) -> str:
    """PostgreSQL's form: C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}."""
    salt, iterations, stored_key, server_key = credentials
    return f"{_SCRAM_PREFIX}{iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _parse_scram(text: str | None) -> ScramCredentials | None:
    """The credentials in L{_format_scram}'s form; C{None} for none or an unreadable value."""
    if text is None or not text.startswith(_SCRAM_PREFIX):
        return None
    try:
        head, keys = text[len(_SCRAM_PREFIX) :].split("$")
        iterations, salt = head.split(":")
        stored_key, server_key = keys.split(":")
        return ScramCredentials(
            base64.b64decode(salt, validate=True),
            int(iterations),
            base64.b64decode(stored_key, validate=True),
            base64.b64decode(server_key, validate=True),
        )
    except (ValueError, binascii.Error):
        return None


@implementer(IDirectory)
class SQLiteDirectory:
    """
    The directory in an SQLite file, shared by the server and the admin CLI.

    One connection, used from the reactor thread (look-ups) and from worker threads
    (L{verify_password}); a lock keeps their transactions apart. Password hashing and checking
    happen outside the lock, so a slow hash never delays a look-up. A write may wait up to
    the 5 s busy timeout for another process's write; the server itself only writes in
    L{bootstrap}, at start.
    """

    def __init__(
        self,
        path: Path,
        primary_domain: str = "",
        *,
        hasher: PasswordHasher | None = None,
        recheck: float = RECHECK,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        Open (and create if needed) the database at C{path}.

        @param path: the SQLite file; created readable by its owner only.
        @param primary_domain: where C{postmaster} mail goes when the addressed domain has no
            postmaster (RFC 5321 §4.5.1); C{""} for none.
        @param hasher: the argon2id hasher for new passwords (tests pass a cheap one).
        @param recheck: seconds a look-up result may be answered without asking SQLite whether
            another connection (the CLI) changed the database; our own writes count at once.
        @param monotonic: the clock of C{recheck}.
        @raise DirectoryError: the file cannot be opened or its schema is newer than this code.
        """
        self.path = path
        self.primary_domain = primary_domain.strip().lower()
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._dummy_hash: str | None = None
        self._lock = threading.Lock()
        # Look-up results, valid while no connection has changed the database: SQLite's
        # data_version moves when another connection (the CLI) commits; our own writes clear
        # the cache themselves. Saves a transaction and several queries per RCPT.
        self._cache: dict[tuple[str, str], Any] = {}
        self._data_version = -1
        # Asking data_version costs a SQLite call that lets go of the GIL: on a busy server the
        # reactor thread then waits for the I/O threads. Asked at most once per `recheck`.
        self._recheck = recheck
        self._monotonic = monotonic
        self._checked_at = -math.inf
        self._verified: dict[bytes, float] = {}  # keyed digest -> monotonic expiry
        self._verified_key = secrets.token_bytes(32)
        self._fake_key = b""  # read from the database by _migrate
        self._db = self._connect(path)
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # -- setup -----------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        """
        Connect with the settings both processes rely on.

        @raise DirectoryError: the database cannot be opened.
        """
        try:
            # Made before SQLite opens it so that the file, and the -wal and -shm files SQLite
            # gives the same mode, hold the password hashes for the owner only.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise DirectoryError(f"cannot open directory database {path}: {e}")
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: a change the CLI reported as done survives a power cut.
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            db.close()
            raise DirectoryError(f"cannot open directory database {path}: {e}")
        return db

    def _migrate(self) -> None:
        """
        Create the schema in a new database, upgrade an older one (in one transaction);
        refuse one made by a newer version. Then read the fake-credentials key.

        @raise DirectoryError: the schema version is unknown.
        """
        with self._transaction(write=True) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if not 0 <= version <= SCHEMA_VERSION:
                raise DirectoryError(
                    f"{self.path}: schema version {version} is not supported "
                    f"(this version knows {SCHEMA_VERSION})"
                )
            if version == 0:
                _run_script(db, _SCHEMA)
                version = 1
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](db)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            row = db.execute("SELECT value FROM meta WHERE name = ?", (_FAKE_KEY,)).fetchone()
        self._fake_key = bytes(row[0])

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """
        Run a block in one transaction, committed if it ends normally, rolled back otherwise.

        @param write: take the write lock at once (C{BEGIN IMMEDIATE}), so a check made in the
            block still holds when the block writes.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            finally:
                if write:
                    self._cache.clear()
                # After an error in the block or a failed COMMIT: the next BEGIN needs a
                # connection that is not in a transaction.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Close the database. The directory cannot be used afterwards."""
        with self._lock:
            self._db.close()

    # -- small queries, run inside a transaction --------------------------------------------

    @staticmethod
    def _has_domain(db: sqlite3.Connection, domain: str) -> bool:
        row = db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone()
        return row is not None

    @staticmethod
    def _has_user(db: sqlite3.Connection, address: str) -> bool:
        row = db.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone()
        return row is not None

    @staticmethod
    def _alias_targets(db: sqlite3.Connection, source: str) -> list[str]:
        rows = db.execute(
            "SELECT target FROM aliases WHERE source = ? ORDER BY target", (source,)
        ).fetchall()
        return [target for (target,) in rows]

    def _require_domain(self, db: sqlite3.Connection, domain: str) -> None:
        if not self._has_domain(db, domain):
            raise DirectoryError(f"domain {domain} does not exist")

    def _require_user(self, db: sqlite3.Connection, address: str) -> None:
        if not self._has_user(db, address):
            raise DirectoryError(f"user {address} does not exist")

    # -- domains ---------------------------------------------------------------------------

    def add_domain(self, name: str) -> None:
        """
        Make C{name} a local domain.

        @raise DirectoryError: C{name} is not a domain name or is already local.
        """
        domain = normalize_domain(name)
        with self._transaction(write=True) as db:
            if self._has_domain(db, domain):
                raise DirectoryError(f"domain {domain} exists")
            db.execute("INSERT INTO domains (name) VALUES (?)", (domain,))

    def remove_domain(self, name: str) -> None:
        """
        Stop treating C{name} as local. Refused while it has users or aliases, so that no
        account is dropped by accident.

        @raise DirectoryError: C{name} does not exist or still has users or aliases.
        """
        domain = normalize_domain(name)
        with self._transaction(write=True) as db:
            self._require_domain(db, domain)
            (users,) = db.execute(
                "SELECT COUNT(*) FROM users WHERE domain = ?", (domain,)
            ).fetchone()
            (aliases,) = db.execute(
                "SELECT COUNT(*) FROM aliases WHERE substr(source, instr(source, '@') + 1) = ?",
                (domain,),
            ).fetchone()
            if users or aliases:
                raise DirectoryError(
                    f"domain {domain} still has {_count(users, 'user', 'users')} and "
                    f"{_count(aliases, 'alias', 'aliases')}: remove them first"
                )
            db.execute("DELETE FROM domains WHERE name = ?", (domain,))

    def list_domains(self) -> list[str]:
        """@return: the local domains, sorted."""
        with self._transaction() as db:
            rows = db.execute("SELECT name FROM domains ORDER BY name").fetchall()
        return [name for (name,) in rows]

    # -- users -----------------------------------------------------------------------------

    def _check_new_user(self, db: sqlite3.Connection, address: str) -> None:
        """
        @raise DirectoryError: C{address} cannot become a user: its domain is not local, or
            it already is a user or an alias (which a user would hide).
        """
        self._require_domain(db, _domain_of(address))
        if self._has_user(db, address):
            raise DirectoryError(f"user {address} exists")
        if self._alias_targets(db, address):
            raise DirectoryError(f"{address} is an alias: remove the alias first")

    def add_user(self, address: str, password: str) -> None:
        """
        Create an account. Only the argon2id hash of C{password} is stored.

        @raise DirectoryError: bad address, domain not local, or the address is taken.
        """
        user = normalize_address(address)
        with self._transaction() as db:
            self._check_new_user(db, user)
        # Hashed outside any transaction: it takes a while and must not hold the lock.
        password_hash, scram = self._secrets(password)
        with self._transaction(write=True) as db:
            self._check_new_user(db, user)
            self._insert_user(db, user, password_hash, scram)

    def _secrets(self, password: str) -> tuple[str, str]:
        """The argon2id hash and the SCRAM-SHA-256 credentials (text form) of C{password}."""
        return self._hasher.hash(password), _format_scram(scram_credentials(password))

    @staticmethod
    def _insert_user(db: sqlite3.Connection, user: str, password_hash: str, scram: str) -> None:
        db.execute(
            "INSERT INTO users (address, domain, password_hash, scram, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (user, _domain_of(user), password_hash, scram, _now()),
        )

    def remove_user(self, address: str) -> None:
        """
        Delete an account, and its extra sender addresses. Aliases pointing at it stay (they
        then reach nobody).

        @raise DirectoryError: no such user.
        """
        user = normalize_address(address)
        with self._transaction(write=True) as db:
            self._require_user(db, user)
            db.execute("DELETE FROM users WHERE address = ?", (user,))
            db.execute("DELETE FROM senders WHERE account = ?", (user,))

    def set_password(self, address: str, password: str) -> None:
        """
        Replace an account's password (its argon2id hash and its SCRAM credentials).

        @raise DirectoryError: no such user.
        """
        user = normalize_address(address)
        with self._transaction() as db:
            self._require_user(db, user)
        password_hash, scram = self._secrets(password)
        with self._transaction(write=True) as db:
            self._require_user(db, user)
            db.execute(
                "UPDATE users SET password_hash = ?, scram = ? WHERE address = ?",
                (password_hash, scram, user),
            )

    def user_exists(self, address: str) -> bool:
        """
        @return: whether C{address} is an account (not an alias); C{False} for a bad address.
        """
        try:
            user = normalize_address(address)
        except DirectoryError:
            return False
        with self._transaction() as db:
            return self._has_user(db, user)

    def list_users(self, domain: str | None = None) -> list[str]:
        """
        @param domain: only this domain's accounts; C{None} for all.
        @return: account addresses, sorted.
        @raise DirectoryError: C{domain} is not a local domain.
        """
        with self._transaction() as db:
            if domain is None:
                rows = db.execute("SELECT address FROM users ORDER BY address").fetchall()
            else:
                name = normalize_domain(domain)
                self._require_domain(db, name)
                rows = db.execute(
                    "SELECT address FROM users WHERE domain = ? ORDER BY address", (name,)
                ).fetchall()
        return [address for (address,) in rows]

    def _password_hash(self, address: str) -> str | None:
        """@return: the stored hash of C{address}, C{None} for no such user or a bad address."""
        try:
            user = normalize_address(address)
        except DirectoryError:
            return None
        with self._transaction() as db:
            row = db.execute(
                "SELECT password_hash FROM users WHERE address = ?", (user,)
            ).fetchone()
        return None if row is None else str(row[0])

    def _dummy(self) -> str:
        """
        A hash of a random password with the current parameters, checked against for unknown
        users so that they take as long as known ones. Made on first use: the CLI never needs
        it. (Two threads may both make it; either result is as good.)
        """
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(18))
        return self._dummy_hash

    def verify_password(self, address: str, password: str | bytes) -> bool:
        """
        Check a password. Blocking (argon2 takes tens of milliseconds): call it in a thread.

        @return: C{True} only if C{address} is an account and C{password} its password.
        """
        stored = self._password_hash(address)
        secret = (
            password.encode("utf-8", "surrogatepass") if isinstance(password, str) else password
        )
        remembered = None
        if stored is not None:
            # A login that succeeded lately is remembered (as a keyed digest of the stored hash
            # and the password, never the password): mail clients log in again and again, and
            # argon2id costs ~0.2 s of CPU and 64 MiB each time. A new password means a new
            # stored hash, so nothing stale can match.
            remembered = hmac.digest(self._verified_key, stored.encode() + b"\0" + secret, "sha256")
            with self._lock:
                expires = self._verified.get(remembered)
            if expires is not None and expires > time.monotonic():
                return True
        try:
            if stored is None:
                # Same work as for a real user, so the time taken does not reveal existence.
                self._hasher.verify(self._dummy(), password)
                return False
            ok = self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False
        if ok and remembered is not None:
            with self._lock:
                if len(self._verified) >= _CACHE_SIZE:
                    self._verified.clear()
                self._verified[remembered] = time.monotonic() + VERIFIED_TTL
        return ok

    def scram_credentials(self, address: str) -> ScramCredentials:
        """
        The SCRAM-SHA-256 credentials of account C{address}.

        For an unknown user, a bad address, or an account that has none yet (made before
        schema 2, until its next password change), a fake: derived from C{address} with a
        secret key kept in the database, so it is the same at every ask and across restarts,
        like a real one, and SCRAM does not reveal who exists. No proof can match it.
        """
        try:
            user = normalize_address(address)
        except DirectoryError:
            user = address.strip().lower()
        else:
            with self._transaction() as db:
                row = db.execute("SELECT scram FROM users WHERE address = ?", (user,)).fetchone()
            found = _parse_scram(None if row is None else row[0])
            if found is not None:
                return found
        return self._fake_scram(user)

    def _fake_scram(self, name: str) -> ScramCredentials:
        encoded = name.encode("utf-8", "surrogatepass")

        def part(label: bytes) -> bytes:
            return hmac.digest(self._fake_key, label + b"\0" + encoded, "sha256")

        return ScramCredentials(
            part(b"salt")[:SALT_SIZE], SCRAM_ITERATIONS, part(b"stored"), part(b"server")
        )

    # -- sender addresses ------------------------------------------------------------------

    def add_sender(self, account: str, address: str) -> None:
        """
        Let C{account} send mail as C{address} too (submission's MAIL FROM), beyond its own
        address and the aliases that reach it.

        @param address: an address (any domain), or C{@domain} for every address of a domain.
        @raise DirectoryError: bad addresses, no such user, or the entry exists.
        """
        user = normalize_address(account)
        sender = normalize_alias_source(address)
        with self._transaction(write=True) as db:
            self._require_user(db, user)
            row = db.execute(
                "SELECT 1 FROM senders WHERE account = ? AND address = ?", (user, sender)
            ).fetchone()
            if row is not None:
                raise DirectoryError(f"{user} may already send as {sender}")
            db.execute("INSERT INTO senders (account, address) VALUES (?, ?)", (user, sender))

    def remove_sender(self, account: str, address: str) -> None:
        """
        Undo L{add_sender}.

        @raise DirectoryError: bad addresses or no such entry.
        """
        user = normalize_address(account)
        sender = normalize_alias_source(address)
        with self._transaction(write=True) as db:
            cursor = db.execute(
                "DELETE FROM senders WHERE account = ? AND address = ?", (user, sender)
            )
            if cursor.rowcount == 0:
                raise DirectoryError(f"{user} has no sender address {sender}")

    def list_senders(self, account: str | None = None) -> list[tuple[str, str]]:
        """
        @param account: only this account's entries; C{None} for all.
        @return: C{(account, address)} pairs from L{add_sender}, sorted.
        @raise DirectoryError: C{account} is not an address.
        """
        with self._transaction() as db:
            if account is None:
                rows = db.execute("SELECT account, address FROM senders ORDER BY account, address")
            else:
                rows = db.execute(
                    "SELECT account, address FROM senders WHERE account = ? ORDER BY address",
                    (normalize_address(account),),
                )
            return [(str(user), str(sender)) for user, sender in rows.fetchall()]

    def may_send_as(self, account: str, address: str) -> bool:
        """
        Whether account C{account} may use C{address} as its envelope sender: its own address;
        an address whose mail reaches it (an alias with it among its targets, a
        C{local+detail} form of one of these, an address its catch-all alias covers); or an
        address granted by L{add_sender} (or its C{+detail} form, or any at a granted
        C{@domain}). Never the null sender, never a name that is no account.
        """
        try:
            user = normalize_address(account)
            sender = normalize_address(address)
        except DirectoryError:
            return False
        return self._cached(
            ("send-as", f"{user}\n{sender}"), lambda db: self._may_send_as(db, user, sender)
        )

    def _may_send_as(self, db: sqlite3.Connection, user: str, sender: str) -> bool:
        if not self._has_user(db, user):
            return False
        if sender == user or user in self._resolve(db, sender):
            return True
        local, domain = _local_of(sender), _domain_of(sender)
        candidates = [sender, "@" + domain]
        base = local.partition("+")[0]
        if base and base != local:
            candidates.append(f"{base}@{domain}")
        marks = ",".join("?" * len(candidates))
        row = db.execute(
            f"SELECT 1 FROM senders WHERE account = ? AND address IN ({marks})",  # noqa: S608
            (user, *candidates),
        ).fetchone()
        return row is not None

    # -- aliases ---------------------------------------------------------------------------

    def add_alias(self, source: str, target: str) -> None:
        """
        Send mail for C{source} to C{target} too (a source may have several targets).

        @param source: C{local@domain}, or C{@domain} for every address of the domain that is
            neither an account nor another alias; the domain must be local.
        @param target: any address, local or remote.
        @raise DirectoryError: bad addresses, source domain not local, source is an account,
            or the alias exists.
        """
        src = normalize_alias_source(source)
        dst = normalize_address(target)
        if src == dst:
            raise DirectoryError(f"alias {src} cannot point to itself")
        with self._transaction(write=True) as db:
            self._require_domain(db, _domain_of(src))
            if self._has_user(db, src):
                raise DirectoryError(f"{src} is a user: an alias for it would never apply")
            if dst in self._alias_targets(db, src):
                raise DirectoryError(f"alias {src} -> {dst} exists")
            db.execute("INSERT INTO aliases (source, target) VALUES (?, ?)", (src, dst))

    def remove_alias(self, source: str, target: str | None = None) -> None:
        """
        Remove one target of an alias, or all of them.

        @param target: the target to remove; C{None} removes the whole alias.
        @raise DirectoryError: no such alias.
        """
        src = normalize_alias_source(source)
        with self._transaction(write=True) as db:
            if target is None:
                cursor = db.execute("DELETE FROM aliases WHERE source = ?", (src,))
                missing = f"alias {src} does not exist"
            else:
                dst = normalize_address(target)
                cursor = db.execute(
                    "DELETE FROM aliases WHERE source = ? AND target = ?", (src, dst)
                )
                missing = f"alias {src} -> {dst} does not exist"
            if cursor.rowcount == 0:
                raise DirectoryError(missing)

    def list_aliases(self) -> list[tuple[str, str]]:
        """@return: every C{(source, target)} pair, sorted."""
        with self._transaction() as db:
            rows = db.execute("SELECT source, target FROM aliases ORDER BY source, target")
            return [(str(source), str(target)) for source, target in rows.fetchall()]

    # -- first start -----------------------------------------------------------------------

    def bootstrap(self, domain: str) -> str | None:
        """
        On first start, when there is no domain at all, create C{domain} and the account
        C{postmaster@domain} with a generated password.

        @return: the generated password (to show the admin once), or C{None} when the
            directory already had a domain and nothing was changed.
        @raise DirectoryError: C{domain} is not a domain name.
        """
        name = normalize_domain(domain)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM domains LIMIT 1").fetchone() is not None:
                return None
        password = secrets.token_urlsafe(18)
        password_hash, scram = self._secrets(password)
        with self._transaction(write=True) as db:
            # Checked again: another process may have added a domain meanwhile.
            if db.execute("SELECT 1 FROM domains LIMIT 1").fetchone() is not None:
                return None
            db.execute("INSERT INTO domains (name) VALUES (?)", (name,))
            self._insert_user(db, f"postmaster@{name}", password_hash, scram)
        return password

    # -- IDirectory ------------------------------------------------------------------------

    def _cached(self, key: tuple[str, str], compute: Callable[[sqlite3.Connection], _V]) -> _V:
        """C{compute} in a read transaction, or its result from when the data was the same."""
        with self._lock:
            now = self._monotonic()
            if now - self._checked_at >= self._recheck:
                self._checked_at = now
                (version,) = self._db.execute("PRAGMA data_version").fetchone()
                if version != self._data_version:
                    self._data_version = version
                    self._cache.clear()
            if key in self._cache:
                value: _V = self._cache[key]
                return value
        with self._transaction() as db:
            value = compute(db)
        with self._lock:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = value
        return value

    def is_local_domain(self, domain: str) -> bool:
        """Whether C{domain} is one of the local domains."""
        domain = domain.lower()
        return self._cached(("domain", domain), lambda db: self._has_domain(db, domain))

    def resolve(self, address: str) -> list[str]:
        """
        The accounts mail to C{address} reaches, in a stable order, without repeats.

        In order: an account; an alias (its targets resolved in turn, remote targets skipped);
        for C{local+detail@domain}, the account or alias C{local@domain}; the catch-all alias
        C{@domain}. C{postmaster} without a domain, and C{postmaster@} a local domain that
        reaches nobody, go to C{postmaster@} the primary domain (RFC 5321 §4.5.1).

        @return: account addresses; C{[]} when nobody receives the mail or the address is bad.
        """
        found = self._cached(("resolve", address), lambda db: tuple(self._resolve(db, address)))
        return list(found)

    def _resolve(self, db: sqlite3.Connection, address: str) -> list[str]:
        if address.strip().lower() == "postmaster":
            return self._primary_postmaster(db)
        try:
            normalized = normalize_address(address)
        except DirectoryError:
            return []
        accounts = self._expand(db, normalized, 0, set())
        if not accounts and _local_of(normalized) == "postmaster":
            if self._has_domain(db, _domain_of(normalized)):
                return self._primary_postmaster(db)
        return accounts

    def _primary_postmaster(self, db: sqlite3.Connection) -> list[str]:
        if not self.primary_domain:
            return []
        return self._expand(db, f"postmaster@{self.primary_domain}", 0, set())

    def _expand(
        self, db: sqlite3.Connection, address: str, depth: int, seen: set[str]
    ) -> list[str]:
        """
        The accounts C{address} reaches.

        @param depth: aliases followed so far; beyond L{MAX_ALIAS_DEPTH} nothing is reached.
        @param seen: addresses already expanded in this look-up: expanding one again could
            only loop or repeat accounts already found.
        """
        if depth > MAX_ALIAS_DEPTH or address in seen:
            return []
        seen.add(address)
        domain = _domain_of(address)
        if not self._has_domain(db, domain):
            # A remote target: forwarding is not done (yet), so it reaches no account here.
            return []
        found = self._expand_exact(db, address, depth, seen)
        local = _local_of(address)
        if found is None and "+" in local:
            base = local.partition("+")[0]
            if base:
                found = self._expand_exact(db, f"{base}@{domain}", depth, seen)
        if found is None:
            catch_all = self._alias_targets(db, "@" + domain)
            found = self._expand_all(db, catch_all, depth, seen)
        return found

    def _expand_exact(
        self, db: sqlite3.Connection, address: str, depth: int, seen: set[str]
    ) -> list[str] | None:
        """
        @return: the accounts C{address} reaches as an account or alias of its own, or
            C{None} when it is neither (so that plus-addressing and catch-all may apply). An
            alias whose targets reach nobody here still matches: it returns C{[]}.
        """
        if self._has_user(db, address):
            return [address]
        targets = self._alias_targets(db, address)
        if not targets:
            return None
        return self._expand_all(db, targets, depth, seen)

    def _expand_all(
        self, db: sqlite3.Connection, targets: list[str], depth: int, seen: set[str]
    ) -> list[str]:
        accounts: list[str] = []
        for target in targets:
            accounts.extend(self._expand(db, target, depth + 1, seen))
        return _dedupe(accounts)


def open_directory(
    data_dir: Path, primary_domain: str = "", *, recheck: float = RECHECK
) -> SQLiteDirectory:
    """
    Open the directory of a server: C{data_dir/db/directory.sqlite}, creating C{data_dir/db}
    (owner only) if needed.

    @param primary_domain: see L{SQLiteDirectory}.
    @param recheck: see L{SQLiteDirectory}.
    @raise DirectoryError: the database cannot be opened.
    """
    db_dir = data_dir / "db"
    try:
        db_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise DirectoryError(f"cannot create {db_dir}: {e}")
    return SQLiteDirectory(db_dir / "directory.sqlite", primary_domain, recheck=recheck)
