"""Tests for L{mailserver.directory}."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

from argon2 import PasswordHasher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailserver.directory import (
    MAX_ALIAS_DEPTH,
    SCHEMA_VERSION,
    DirectoryError,
    SQLiteDirectory,
    normalize_address,
    normalize_alias_source,
    normalize_domain,
    open_directory,
)
from mailserver.interfaces import IDirectory
from mailserver.sasl import SCRAM_ITERATIONS, ScramSHA256, Success, scram_credentials
from tests.test_sasl import client_final


def cheap_hasher() -> PasswordHasher:
    """Still argon2id, but with parameters that keep the tests fast."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class RecordingHasher(PasswordHasher):
    """A cheap hasher that records the hashes it is asked to verify against."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str | bytes] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:  # type: ignore[override]
        self.verified.append(hash)
        return super().verify(hash, password)


class DirectoryTestCase(SynchronousTestCase):
    """Makes directories in temporary files."""

    def open(self, path: Path | None = None, primary: str = "example.org") -> SQLiteDirectory:
        if path is None:
            path = Path(self.mktemp())
            path.mkdir()
            path = path / "directory.sqlite"
        # recheck=0: every look-up asks whether another connection changed the database.
        directory = SQLiteDirectory(path, primary, hasher=cheap_hasher(), recheck=0)
        self.addCleanup(directory.close)
        return directory

    def populated(self) -> SQLiteDirectory:
        """A directory with domain example.org and the user alice@example.org."""
        directory = self.open()
        directory.add_domain("example.org")
        directory.add_user("alice@example.org", "alice-password")
        return directory


class NormalizeAddressTests(SynchronousTestCase):
    """L{normalize_address}, L{normalize_domain} and L{normalize_alias_source}."""

    def test_lowercases_and_strips(self) -> None:
        """Both parts are lower-cased and surrounding white space is removed."""
        self.assertEqual(
            normalize_address("  Alice.Smith@Example.ORG \n"), "alice.smith@example.org"
        )

    def test_utf8_local_part(self) -> None:
        """A non-ASCII local part is accepted (SMTPUTF8) and lower-cased."""
        self.assertEqual(normalize_address("Jürgen@example.org"), "jürgen@example.org")

    def test_nfc(self) -> None:
        """A decomposed local part becomes the composed (NFC) form, so both name one account."""
        self.assertEqual(normalize_address("ju\u0308rgen@example.org"), "j\u00fcrgen@example.org")

    def test_localhost(self) -> None:
        """The single-label domain C{localhost} is accepted."""
        self.assertEqual(normalize_address("root@LocalHost"), "root@localhost")

    def test_local_part_length(self) -> None:
        """A local part of 64 octets is accepted; 65 octets, counted in UTF-8, is refused."""
        self.assertEqual(normalize_address("a" * 64 + "@d.org"), "a" * 64 + "@d.org")
        self.assertEqual(normalize_address("é" * 32 + "@d.org"), "é" * 32 + "@d.org")
        self.assertRaises(DirectoryError, normalize_address, "a" * 65 + "@d.org")
        self.assertRaises(DirectoryError, normalize_address, "é" * 33 + "@d.org")

    def test_refused(self) -> None:
        """
        Addresses that could escape a mailbox directory or are not addresses are refused with
        L{DirectoryError}.
        """
        for bad in [
            "",
            "   ",
            "alice",
            "../x@d",
            "a/b@d",
            "a@b@c",
            "@example.org",
            "alice@",
            ".@d",
            "..@d",
            ".hidden@d",
            "a b@d",
            "a\tb@d",
            "a\x00b@d",
            "a\x07b@d",
            "a\u200bb@d",
            "a@exa_mple.org",
            "a@example.org.",
            "a@-example.org",
            "a@example-.org",
            "a@example..org",
            "a@exämple.org",
            "a@" + "x" * 64 + ".org",
        ]:
            with self.subTest(address=bad):
                self.assertRaises(DirectoryError, normalize_address, bad)

    def test_message(self) -> None:
        """The error says what is wrong."""
        e = self.assertRaises(DirectoryError, normalize_address, "a@b@c")
        self.assertIn("exactly one @", str(e))

    def test_domain(self) -> None:
        """L{normalize_domain} lower-cases a domain and refuses non-domains."""
        self.assertEqual(normalize_domain(" Mail.Example.ORG "), "mail.example.org")
        for bad in ["", "a..b", "a_b.org", "example.org.", "a b", "-a.org"]:
            with self.subTest(domain=bad):
                self.assertRaises(DirectoryError, normalize_domain, bad)

    def test_alias_source(self) -> None:
        """An alias source is an address or C{@domain} (a catch-all)."""
        self.assertEqual(normalize_alias_source("@Example.org"), "@example.org")
        self.assertEqual(normalize_alias_source("Sales@Example.org"), "sales@example.org")
        self.assertRaises(DirectoryError, normalize_alias_source, "@")
        self.assertRaises(DirectoryError, normalize_alias_source, "@@example.org")


class OpenTests(DirectoryTestCase):
    """Opening the database."""

    def test_provides(self) -> None:
        """L{SQLiteDirectory} provides L{IDirectory}."""
        self.assertTrue(verifyObject(IDirectory, self.open()))

    def test_open_directory(self) -> None:
        """
        L{open_directory} creates C{data_dir/db} for its owner only and the database file in
        it, readable by its owner only.
        """
        data_dir = Path(self.mktemp())
        directory = open_directory(data_dir, "example.org")
        self.addCleanup(directory.close)
        db_dir = data_dir / "db"
        self.assertEqual(directory.path, db_dir / "directory.sqlite")
        self.assertEqual(stat.S_IMODE(db_dir.stat().st_mode) & 0o077, 0)
        self.assertEqual(stat.S_IMODE(directory.path.stat().st_mode), 0o600)
        self.assertEqual(directory.primary_domain, "example.org")

    def test_settings(self) -> None:
        """The connection uses WAL, synchronous=FULL, a 5 s busy timeout and the schema version."""
        directory = self.open()
        db = sqlite3.connect(directory.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        own = directory._db
        self.assertEqual(own.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(own.execute("PRAGMA busy_timeout").fetchone()[0], 5000)

    def test_reopen(self) -> None:
        """Reopening a database keeps its contents."""
        first = self.populated()
        first.close()
        second = self.open(first.path)
        self.assertEqual(second.list_users(), ["alice@example.org"])

    def test_newer_schema(self) -> None:
        """A database with a newer schema version is refused instead of misread."""
        directory = self.open()
        directory.close()
        db = sqlite3.connect(directory.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        e = self.assertRaises(DirectoryError, SQLiteDirectory, directory.path)
        self.assertIn("schema version 99", str(e))

    def test_unopenable(self) -> None:
        """A database that cannot be created raises L{DirectoryError} naming the file."""
        path = Path(self.mktemp()) / "missing" / "directory.sqlite"
        e = self.assertRaises(DirectoryError, SQLiteDirectory, path)
        self.assertIn(str(path), str(e))


class DomainTests(DirectoryTestCase):
    """Domain management."""

    def test_add_list(self) -> None:
        """Added domains are listed sorted and lower case, and are local."""
        directory = self.open()
        directory.add_domain("Example.ORG")
        directory.add_domain("a.example")
        self.assertEqual(directory.list_domains(), ["a.example", "example.org"])
        self.assertTrue(directory.is_local_domain("example.org"))
        self.assertTrue(directory.is_local_domain("EXAMPLE.org"))
        self.assertFalse(directory.is_local_domain("example.net"))

    def test_add_twice(self) -> None:
        """Adding an existing domain is refused."""
        directory = self.open()
        directory.add_domain("example.org")
        e = self.assertRaises(DirectoryError, directory.add_domain, "EXAMPLE.org")
        self.assertEqual(str(e), "domain example.org exists")

    def test_add_bad(self) -> None:
        """A name that is not a domain is refused."""
        self.assertRaises(DirectoryError, self.open().add_domain, "not a domain")

    def test_remove(self) -> None:
        """A removed domain is no longer local."""
        directory = self.open()
        directory.add_domain("example.org")
        directory.remove_domain("example.org")
        self.assertEqual(directory.list_domains(), [])
        self.assertFalse(directory.is_local_domain("example.org"))

    def test_remove_unknown(self) -> None:
        """Removing a domain that does not exist is refused."""
        e = self.assertRaises(DirectoryError, self.open().remove_domain, "example.org")
        self.assertEqual(str(e), "domain example.org does not exist")

    def test_remove_with_users(self) -> None:
        """A domain with users cannot be removed; the message says why."""
        directory = self.populated()
        e = self.assertRaises(DirectoryError, directory.remove_domain, "example.org")
        self.assertIn("1 user", str(e))
        self.assertIn("remove them first", str(e))
        self.assertEqual(directory.list_domains(), ["example.org"])

    def test_remove_with_aliases(self) -> None:
        """A domain with aliases (catch-all included) cannot be removed."""
        directory = self.open()
        directory.add_domain("example.org")
        directory.add_alias("@example.org", "x@remote.example")
        directory.add_alias("sales@example.org", "x@remote.example")
        e = self.assertRaises(DirectoryError, directory.remove_domain, "example.org")
        self.assertIn("2 aliases", str(e))
        directory.remove_alias("@example.org")
        directory.remove_alias("sales@example.org")
        directory.remove_domain("example.org")

    def test_aliases_to_domain_do_not_block(self) -> None:
        """Aliases of another domain pointing into a domain do not stop its removal."""
        directory = self.open()
        directory.add_domain("example.org")
        directory.add_domain("example.net")
        directory.add_alias("a@example.net", "b@example.org")
        directory.remove_domain("example.org")
        self.assertEqual(directory.list_domains(), ["example.net"])


class UserTests(DirectoryTestCase):
    """Account management and passwords."""

    def test_add_requires_domain(self) -> None:
        """A user cannot be added to a domain that is not local."""
        directory = self.open()
        e = self.assertRaises(DirectoryError, directory.add_user, "bob@example.net", "password")
        self.assertEqual(str(e), "domain example.net does not exist")

    def test_add_twice(self) -> None:
        """Adding an existing user (in any case) is refused."""
        directory = self.populated()
        e = self.assertRaises(DirectoryError, directory.add_user, "Alice@Example.org", "x" * 8)
        self.assertEqual(str(e), "user alice@example.org exists")

    def test_add_bad_address(self) -> None:
        """A bad address is refused."""
        directory = self.populated()
        self.assertRaises(DirectoryError, directory.add_user, "../x@example.org", "password")

    def test_add_over_alias(self) -> None:
        """An address that is an alias cannot become a user (the user would hide the alias)."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        e = self.assertRaises(DirectoryError, directory.add_user, "sales@example.org", "password")
        self.assertIn("is an alias", str(e))

    def test_list(self) -> None:
        """Users are listed sorted, all or for one domain; an unknown domain is refused."""
        directory = self.populated()
        directory.add_domain("example.net")
        directory.add_user("Bob@example.net", "password")
        directory.add_user("aaron@example.org", "password")
        self.assertEqual(
            directory.list_users(), ["aaron@example.org", "alice@example.org", "bob@example.net"]
        )
        self.assertEqual(directory.list_users("Example.NET"), ["bob@example.net"])
        self.assertRaises(DirectoryError, directory.list_users, "nowhere.example")

    def test_remove(self) -> None:
        """A removed user no longer exists; removing an unknown user is refused."""
        directory = self.populated()
        directory.remove_user("ALICE@example.org")
        self.assertEqual(directory.list_users(), [])
        self.assertFalse(directory.user_exists("alice@example.org"))
        e = self.assertRaises(DirectoryError, directory.remove_user, "alice@example.org")
        self.assertEqual(str(e), "user alice@example.org does not exist")

    def test_user_exists(self) -> None:
        """L{SQLiteDirectory.user_exists} is true for accounts only, in any case."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        self.assertTrue(directory.user_exists("ALICE@example.org"))
        self.assertFalse(directory.user_exists("sales@example.org"))
        self.assertFalse(directory.user_exists("not an address"))

    def test_verify(self) -> None:
        """The right password verifies, in any case of the address; a wrong one does not."""
        directory = self.populated()
        self.assertTrue(directory.verify_password("alice@example.org", "alice-password"))
        self.assertTrue(directory.verify_password("Alice@EXAMPLE.org", "alice-password"))
        self.assertTrue(directory.verify_password("alice@example.org", b"alice-password"))
        self.assertFalse(directory.verify_password("alice@example.org", "Alice-password"))
        self.assertFalse(directory.verify_password("alice@example.org", ""))

    def test_verify_unknown(self) -> None:
        """Unknown users and bad addresses do not verify, whatever the password."""
        directory = self.populated()
        self.assertFalse(directory.verify_password("bob@example.org", "alice-password"))
        self.assertFalse(directory.verify_password("a/b@example.org", "alice-password"))

    def test_verify_unknown_does_the_work(self) -> None:
        """
        For an unknown user an argon2 verification is still done, so the time taken does not
        tell whether the user exists.
        """
        hasher = RecordingHasher()
        path = Path(self.mktemp())
        path.mkdir()
        directory = SQLiteDirectory(path / "d.sqlite", hasher=hasher)
        self.addCleanup(directory.close)
        self.assertFalse(directory.verify_password("nobody@example.org", "password"))
        self.assertFalse(directory.verify_password("bad address", "password"))
        self.assertEqual(len(hasher.verified), 2)
        self.assertTrue(str(hasher.verified[0]).startswith("$argon2id$"))

    def test_verify_broken_hash(self) -> None:
        """A stored hash that is not an argon2 hash verifies nothing (and raises nothing)."""
        directory = self.populated()
        db = sqlite3.connect(directory.path)
        with db:
            db.execute("UPDATE users SET password_hash = 'not a hash'")
        db.close()
        self.assertFalse(directory.verify_password("alice@example.org", "alice-password"))

    def test_set_password(self) -> None:
        """After a password change only the new password verifies."""
        directory = self.populated()
        directory.set_password("Alice@example.org", "new-password")
        self.assertFalse(directory.verify_password("alice@example.org", "alice-password"))
        self.assertTrue(directory.verify_password("alice@example.org", "new-password"))

    def test_set_password_unknown(self) -> None:
        """Changing the password of an unknown user is refused."""
        directory = self.populated()
        e = self.assertRaises(DirectoryError, directory.set_password, "bob@example.org", "pw")
        self.assertEqual(str(e), "user bob@example.org does not exist")

    def test_argon2id_stored(self) -> None:
        """
        With the default hasher the stored hash is argon2id, and the plaintext password is in
        none of the database's files.
        """
        path = Path(self.mktemp())
        directory = open_directory(path)
        self.addCleanup(directory.close)
        directory.add_domain("example.org")
        password = "Plaintext-Secret-4711"
        directory.add_user("alice@example.org", password)
        directory.set_password("alice@example.org", password + "-2")
        (stored,) = directory._db.execute("SELECT password_hash FROM users").fetchone()
        self.assertTrue(stored.startswith("$argon2id$"), stored)
        self.assertTrue(directory.verify_password("alice@example.org", password + "-2"))
        files = list((path / "db").iterdir())
        self.assertIn(path / "db" / "directory.sqlite", files)
        for file in files:
            self.assertNotIn(password.encode(), file.read_bytes(), file)


class VerifiedCacheTests(DirectoryTestCase):
    """A successful password check is remembered; nothing stale or wrong ever matches."""

    def directory_with(self, hasher: RecordingHasher) -> SQLiteDirectory:
        path = Path(self.mktemp())
        path.mkdir()
        directory = SQLiteDirectory(path / "d.sqlite", "example.org", hasher=hasher)
        self.addCleanup(directory.close)
        directory.add_domain("example.org")
        directory.add_user("alice@example.org", "alice-password")
        return directory

    def test_second_login_skips_argon2(self) -> None:
        hasher = RecordingHasher()
        directory = self.directory_with(hasher)
        self.assertTrue(directory.verify_password("alice@example.org", "alice-password"))
        self.assertTrue(directory.verify_password("alice@example.org", "alice-password"))
        self.assertTrue(directory.verify_password("Alice@Example.org", b"alice-password"))
        self.assertEqual(len(hasher.verified), 1)

    def test_wrong_password_is_never_remembered(self) -> None:
        hasher = RecordingHasher()
        directory = self.directory_with(hasher)
        self.assertTrue(directory.verify_password("alice@example.org", "alice-password"))
        self.assertFalse(directory.verify_password("alice@example.org", "alice-passwore"))
        self.assertFalse(directory.verify_password("alice@example.org", "wrong"))
        self.assertEqual(len(hasher.verified), 3)

    def test_new_password_forgets_the_old_one(self) -> None:
        """After `user passwd` (here from a second connection, as the CLI does) the old
        password no longer works, though it was remembered."""
        hasher = RecordingHasher()
        directory = self.directory_with(hasher)
        self.assertTrue(directory.verify_password("alice@example.org", "alice-password"))
        other = SQLiteDirectory(directory.path, "example.org", hasher=cheap_hasher())
        other.set_password("alice@example.org", "new-password")
        other.close()
        self.assertFalse(directory.verify_password("alice@example.org", "alice-password"))
        self.assertTrue(directory.verify_password("alice@example.org", "new-password"))


class AliasTests(DirectoryTestCase):
    """Alias management."""

    def test_add_list(self) -> None:
        """Aliases are listed as sorted (source, target) pairs, lower case."""
        directory = self.populated()
        directory.add_alias("Sales@example.org", "Alice@example.org")
        directory.add_alias("sales@example.org", "bob@remote.example")
        directory.add_alias("@Example.org", "alice@example.org")
        self.assertEqual(
            directory.list_aliases(),
            [
                ("@example.org", "alice@example.org"),
                ("sales@example.org", "alice@example.org"),
                ("sales@example.org", "bob@remote.example"),
            ],
        )

    def test_add_twice(self) -> None:
        """The same source and target cannot be added twice."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        e = self.assertRaises(
            DirectoryError, directory.add_alias, "SALES@example.org", "alice@EXAMPLE.org"
        )
        self.assertEqual(str(e), "alias sales@example.org -> alice@example.org exists")

    def test_source_domain_must_be_local(self) -> None:
        """An alias source (catch-all too) must be in a local domain."""
        directory = self.populated()
        e = self.assertRaises(
            DirectoryError, directory.add_alias, "sales@example.net", "alice@example.org"
        )
        self.assertEqual(str(e), "domain example.net does not exist")
        self.assertRaises(DirectoryError, directory.add_alias, "@example.net", "alice@example.org")

    def test_source_is_user(self) -> None:
        """An account cannot also be an alias source: the alias would never apply."""
        directory = self.populated()
        e = self.assertRaises(
            DirectoryError, directory.add_alias, "alice@example.org", "x@remote.example"
        )
        self.assertIn("is a user", str(e))

    def test_bad_addresses(self) -> None:
        """Bad sources and targets, and catch-all targets, are refused."""
        directory = self.populated()
        self.assertRaises(DirectoryError, directory.add_alias, "a/b@example.org", "alice@d.org")
        self.assertRaises(DirectoryError, directory.add_alias, "x@example.org", "../x@d.org")
        self.assertRaises(DirectoryError, directory.add_alias, "x@example.org", "@example.org")

    def test_self(self) -> None:
        """An alias cannot point to itself."""
        directory = self.populated()
        self.assertRaises(DirectoryError, directory.add_alias, "x@example.org", "X@example.org")

    def test_remove_one_target(self) -> None:
        """Removing with a target removes only that target."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        directory.add_alias("sales@example.org", "bob@remote.example")
        directory.remove_alias("Sales@example.org", "BOB@remote.example")
        self.assertEqual(directory.list_aliases(), [("sales@example.org", "alice@example.org")])

    def test_remove_all_targets(self) -> None:
        """Removing without a target removes every target of the source."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        directory.add_alias("sales@example.org", "bob@remote.example")
        directory.add_alias("@example.org", "alice@example.org")
        directory.remove_alias("sales@example.org")
        self.assertEqual(directory.list_aliases(), [("@example.org", "alice@example.org")])

    def test_remove_unknown(self) -> None:
        """Removing an alias or target that does not exist is refused."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        e = self.assertRaises(DirectoryError, directory.remove_alias, "info@example.org")
        self.assertEqual(str(e), "alias info@example.org does not exist")
        e = self.assertRaises(
            DirectoryError, directory.remove_alias, "sales@example.org", "bob@example.org"
        )
        self.assertEqual(str(e), "alias sales@example.org -> bob@example.org does not exist")


class ResolveTests(DirectoryTestCase):
    """L{SQLiteDirectory.resolve}."""

    def test_user(self) -> None:
        """An account resolves to itself."""
        self.assertEqual(self.populated().resolve("alice@example.org"), ["alice@example.org"])

    def test_case_insensitive(self) -> None:
        """Local part and domain are matched whatever their case, for users and aliases."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("ALICE@Example.Org"), ["alice@example.org"])
        self.assertEqual(directory.resolve("Sales@EXAMPLE.ORG"), ["alice@example.org"])

    def test_unknown(self) -> None:
        """An unknown address of a local domain resolves to nobody."""
        self.assertEqual(self.populated().resolve("bob@example.org"), [])

    def test_remote_domain(self) -> None:
        """An address of a domain that is not local resolves to nobody."""
        self.assertEqual(self.populated().resolve("alice@example.net"), [])

    def test_bad_address(self) -> None:
        """Bad addresses resolve to nobody instead of raising."""
        directory = self.populated()
        for bad in ["", "a/b@example.org", "a@b@example.org", "../alice@example.org", "alice"]:
            with self.subTest(address=bad):
                self.assertEqual(directory.resolve(bad), [])

    def test_alias_targets(self) -> None:
        """An alias with several targets resolves to each account once, sorted."""
        directory = self.populated()
        directory.add_user("bob@example.org", "password")
        directory.add_alias("team@example.org", "bob@example.org")
        directory.add_alias("team@example.org", "alice@example.org")
        directory.add_alias("team@example.org", "staff@example.org")
        directory.add_alias("staff@example.org", "alice@example.org")
        self.assertEqual(
            directory.resolve("team@example.org"), ["alice@example.org", "bob@example.org"]
        )

    def test_alias_chain(self) -> None:
        """An alias may point to an alias, and so on."""
        directory = self.populated()
        directory.add_alias("a@example.org", "b@example.org")
        directory.add_alias("b@example.org", "c@example.org")
        directory.add_alias("c@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("a@example.org"), ["alice@example.org"])

    def test_alias_depth_limit(self) -> None:
        """
        A chain of L{MAX_ALIAS_DEPTH} aliases is followed to its end; one alias more and it
        reaches nobody.
        """
        directory = self.populated()
        names = [f"a{i}@example.org" for i in range(MAX_ALIAS_DEPTH + 1)]
        for source, target in zip(names, names[1:] + ["alice@example.org"], strict=True):
            directory.add_alias(source, target)
        self.assertEqual(directory.resolve(names[1]), ["alice@example.org"])
        self.assertEqual(directory.resolve(names[0]), [])

    def test_alias_cycle(self) -> None:
        """A cycle of aliases terminates; accounts on the way are still found."""
        directory = self.populated()
        directory.add_alias("a@example.org", "b@example.org")
        directory.add_alias("b@example.org", "a@example.org")
        self.assertEqual(directory.resolve("a@example.org"), [])
        directory.add_alias("b@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("a@example.org"), ["alice@example.org"])
        self.assertEqual(directory.resolve("b@example.org"), ["alice@example.org"])

    def test_remote_targets_skipped(self) -> None:
        """Targets in other domains are not accounts here and are left out."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "bob@remote.example")
        directory.add_alias("sales@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("sales@example.org"), ["alice@example.org"])

    def test_remote_only_alias(self) -> None:
        """
        An alias whose targets are all remote reaches nobody, and the catch-all does not
        take its mail.
        """
        directory = self.populated()
        directory.add_alias("fwd@example.org", "bob@remote.example")
        directory.add_alias("@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("fwd@example.org"), [])

    def test_dangling_target(self) -> None:
        """An alias target that is not (or no longer) an account reaches nobody."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        directory.remove_user("alice@example.org")
        self.assertEqual(directory.resolve("sales@example.org"), [])

    def test_plus_user(self) -> None:
        """C{user+detail} reaches the account C{user}; only the first C{+} counts."""
        directory = self.populated()
        self.assertEqual(directory.resolve("alice+lists@example.org"), ["alice@example.org"])
        self.assertEqual(directory.resolve("Alice+a+b@example.org"), ["alice@example.org"])

    def test_plus_alias(self) -> None:
        """C{alias+detail} reaches the alias's accounts."""
        directory = self.populated()
        directory.add_alias("sales@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("sales+web@example.org"), ["alice@example.org"])

    def test_plus_exact_first(self) -> None:
        """An account whose name contains C{+} is matched exactly before plus-addressing."""
        directory = self.populated()
        directory.add_user("alice+work@example.org", "password")
        self.assertEqual(directory.resolve("alice+work@example.org"), ["alice+work@example.org"])

    def test_plus_unknown(self) -> None:
        """Plus-addressing of an unknown name, or an empty name, reaches nobody."""
        directory = self.populated()
        self.assertEqual(directory.resolve("bob+x@example.org"), [])
        self.assertEqual(directory.resolve("+x@example.org"), [])

    def test_catch_all(self) -> None:
        """
        Unknown addresses of a domain with a catch-all go to its targets; accounts, aliases
        and other domains are not affected.
        """
        directory = self.populated()
        directory.add_user("bob@example.org", "password")
        directory.add_domain("example.net")
        directory.add_alias("@example.org", "alice@example.org")
        directory.add_alias("sales@example.org", "bob@example.org")
        self.assertEqual(directory.resolve("anything@example.org"), ["alice@example.org"])
        self.assertEqual(directory.resolve("bob@example.org"), ["bob@example.org"])
        self.assertEqual(directory.resolve("sales@example.org"), ["bob@example.org"])
        self.assertEqual(directory.resolve("anything@example.net"), [])

    def test_plus_before_catch_all(self) -> None:
        """Plus-addressing is tried before the catch-all, which takes what it does not match."""
        directory = self.populated()
        directory.add_user("bob@example.org", "password")
        directory.add_alias("@example.org", "bob@example.org")
        self.assertEqual(directory.resolve("alice+x@example.org"), ["alice@example.org"])
        self.assertEqual(directory.resolve("carol+x@example.org"), ["bob@example.org"])

    def test_catch_all_loop(self) -> None:
        """A catch-all pointing to an unknown address of its own domain terminates."""
        directory = self.populated()
        directory.add_alias("@example.org", "nobody@example.org")
        self.assertEqual(directory.resolve("x@example.org"), [])

    def test_postmaster_bare(self) -> None:
        """
        C{postmaster} without a domain, in any case, reaches C{postmaster@} the primary domain.
        """
        directory = self.populated()
        directory.add_user("postmaster@example.org", "password")
        self.assertEqual(directory.resolve("postmaster"), ["postmaster@example.org"])
        self.assertEqual(directory.resolve("PostMaster"), ["postmaster@example.org"])

    def test_postmaster_bare_follows_rules(self) -> None:
        """The primary domain's postmaster may itself be an alias."""
        directory = self.populated()
        directory.add_alias("postmaster@example.org", "alice@example.org")
        self.assertEqual(directory.resolve("postmaster"), ["alice@example.org"])

    def test_postmaster_fallback(self) -> None:
        """
        C{postmaster@} a local domain that reaches nobody goes to the primary domain's
        postmaster; one with its own account keeps it; a remote domain's does not.
        """
        directory = self.populated()
        directory.add_user("postmaster@example.org", "password")
        directory.add_domain("example.net")
        directory.add_domain("example.com")
        directory.add_user("postmaster@example.com", "password")
        self.assertEqual(directory.resolve("Postmaster@example.net"), ["postmaster@example.org"])
        self.assertEqual(directory.resolve("postmaster@example.com"), ["postmaster@example.com"])
        self.assertEqual(directory.resolve("postmaster@remote.example"), [])

    def test_postmaster_no_primary(self) -> None:
        """Without a primary domain (or its postmaster) bare postmaster reaches nobody."""
        directory = self.open(primary="")
        directory.add_domain("example.org")
        self.assertEqual(directory.resolve("postmaster"), [])
        self.assertEqual(directory.resolve("postmaster@example.org"), [])
        self.assertEqual(self.populated().resolve("postmaster"), [])

    def test_other_instance_sees_changes(self) -> None:
        """
        A second directory on the same file (the server while the CLI runs) sees every change
        at its next look-up, without reopening.
        """
        cli = self.open()
        server = self.open(cli.path)
        self.assertFalse(server.is_local_domain("example.org"))
        cli.add_domain("example.org")
        self.assertTrue(server.is_local_domain("example.org"))
        self.assertEqual(server.resolve("alice@example.org"), [])
        cli.add_user("alice@example.org", "alice-password")
        self.assertEqual(server.resolve("alice@example.org"), ["alice@example.org"])
        self.assertTrue(server.verify_password("alice@example.org", "alice-password"))
        cli.add_alias("sales@example.org", "alice@example.org")
        self.assertEqual(server.resolve("sales@example.org"), ["alice@example.org"])
        cli.set_password("alice@example.org", "changed-password")
        self.assertTrue(server.verify_password("alice@example.org", "changed-password"))
        cli.remove_alias("sales@example.org")
        cli.remove_user("alice@example.org")
        self.assertEqual(server.resolve("sales@example.org"), [])
        self.assertEqual(server.resolve("alice@example.org"), [])

    def test_threads(self) -> None:
        """
        Look-ups and password checks from several threads at once share the connection
        without errors.
        """
        directory = self.populated()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(30):
                    assert directory.resolve("alice@example.org") == ["alice@example.org"]
                    assert directory.verify_password("alice@example.org", "alice-password")
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(100):
            self.assertTrue(directory.is_local_domain("example.org"))
        for t in threads:
            t.join()
        self.assertEqual(errors, [])


class BootstrapTests(DirectoryTestCase):
    """L{SQLiteDirectory.bootstrap}."""

    def test_first_start(self) -> None:
        """
        An empty directory gets the domain and a postmaster account whose password is
        returned.
        """
        directory = self.open()
        password = directory.bootstrap("Example.org")
        assert password is not None
        self.assertGreaterEqual(len(password), 20)
        self.assertEqual(directory.list_domains(), ["example.org"])
        self.assertEqual(directory.list_users(), ["postmaster@example.org"])
        self.assertTrue(directory.verify_password("postmaster@example.org", password))

    def test_only_once(self) -> None:
        """A second bootstrap returns None and changes nothing."""
        directory = self.open()
        password = directory.bootstrap("example.org")
        self.assertIsNone(directory.bootstrap("example.org"))
        self.assertIsNone(directory.bootstrap("example.net"))
        self.assertEqual(directory.list_domains(), ["example.org"])
        assert password is not None
        self.assertTrue(directory.verify_password("postmaster@example.org", password))

    def test_existing_domain(self) -> None:
        """A directory that has any domain is left alone."""
        directory = self.open()
        directory.add_domain("example.net")
        self.assertIsNone(directory.bootstrap("example.org"))
        self.assertEqual(directory.list_domains(), ["example.net"])
        self.assertEqual(directory.list_users(), [])

    def test_bad_domain(self) -> None:
        """An empty or bad domain is refused."""
        directory = self.open()
        self.assertRaises(DirectoryError, directory.bootstrap, "")
        self.assertRaises(DirectoryError, directory.bootstrap, "not a domain")
        self.assertEqual(directory.list_domains(), [])


class PermissionTests(SynchronousTestCase):
    """The database file's mode."""

    def test_existing_file_mode_kept(self) -> None:
        """Opening an existing database does not change its mode."""
        path = Path(self.mktemp())
        path.mkdir()
        file = path / "d.sqlite"
        SQLiteDirectory(file, hasher=cheap_hasher()).close()
        os.chmod(file, 0o640)
        SQLiteDirectory(file, hasher=cheap_hasher()).close()
        self.assertEqual(stat.S_IMODE(file.stat().st_mode), 0o640)


SCHEMA_1 = """
CREATE TABLE domains (name TEXT PRIMARY KEY NOT NULL);
CREATE TABLE users (
    address TEXT PRIMARY KEY NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    password_hash TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX users_domain ON users(domain);
CREATE TABLE aliases (source TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (source, target));
PRAGMA user_version = 1;
"""
"""The schema of the first release, as it was."""


def scram_login(directory: SQLiteDirectory, username: str, password: str) -> bool:
    """A whole SCRAM-SHA-256 exchange with the directory's credentials: whether it succeeds."""
    scram = ScramSHA256(directory.scram_credentials)
    bare = f"n={username},r=clientnonce"
    challenge = scram.respond(f"n,,{bare}".encode())
    final, verifier = client_final(password, bare, challenge.data.decode())  # type: ignore[union-attr]
    step = scram.respond(final)
    if isinstance(step, Success):
        assert step.data == verifier
        return True
    return False


class ScramCredentialTests(DirectoryTestCase):
    """SCRAM-SHA-256 credentials: stored with every password, never the password."""

    def test_add_user_stores_credentials(self) -> None:
        """A new account's credentials: 16-octet salt, 4096 iterations, keys of its password."""
        directory = self.populated()
        salt, iterations, stored_key, server_key = directory.scram_credentials("alice@example.org")
        self.assertEqual(len(salt), 16)
        self.assertEqual(iterations, SCRAM_ITERATIONS)
        self.assertEqual(
            scram_credentials("alice-password", salt, iterations),
            (salt, iterations, stored_key, server_key),
        )
        self.assertTrue(scram_login(directory, "alice@example.org", "alice-password"))
        self.assertFalse(scram_login(directory, "alice@example.org", "wrong"))

    def test_stored_form(self) -> None:
        """PostgreSQL's text form in the C{scram} column; no password in any file."""
        directory = self.populated()
        (stored,) = directory._db.execute("SELECT scram FROM users").fetchone()
        self.assertTrue(stored.startswith("SCRAM-SHA-256$4096:"), stored)
        self.assertNotIn("alice-password", stored)
        for file in directory.path.parent.iterdir():
            self.assertNotIn(b"alice-password", file.read_bytes())

    def test_case_of_address(self) -> None:
        directory = self.populated()
        self.assertEqual(
            directory.scram_credentials("Alice@EXAMPLE.org"),
            directory.scram_credentials("alice@example.org"),
        )

    def test_set_password_replaces_credentials(self) -> None:
        directory = self.populated()
        before = directory.scram_credentials("alice@example.org")
        directory.set_password("alice@example.org", "new-password")
        after = directory.scram_credentials("alice@example.org")
        self.assertNotEqual(before.salt, after.salt)
        self.assertFalse(scram_login(directory, "alice@example.org", "alice-password"))
        self.assertTrue(scram_login(directory, "alice@example.org", "new-password"))

    def test_bootstrap_stores_credentials(self) -> None:
        directory = self.open()
        password = directory.bootstrap("example.org")
        assert password is not None
        self.assertTrue(scram_login(directory, "postmaster@example.org", password))

    def test_unknown_user_gets_a_stable_fake(self) -> None:
        """
        An unknown user gets credentials that look like real ones and stay the same, also in
        another instance (the CLI, or the server after a restart); another name gets others.
        """
        directory = self.populated()
        fake = directory.scram_credentials("nobody@example.org")
        self.assertEqual(len(fake.salt), 16)
        self.assertEqual(fake.iterations, SCRAM_ITERATIONS)
        self.assertEqual(directory.scram_credentials("nobody@example.org"), fake)
        self.assertNotEqual(directory.scram_credentials("other@example.org").salt, fake.salt)
        directory.close()
        again = self.open(directory.path)
        self.assertEqual(again.scram_credentials("nobody@example.org"), fake)
        self.assertFalse(scram_login(again, "nobody@example.org", "alice-password"))

    def test_bad_address_gets_a_fake(self) -> None:
        directory = self.populated()
        fake = directory.scram_credentials("not an address")
        self.assertEqual(directory.scram_credentials("not an address"), fake)

    def test_fake_key_differs_between_databases(self) -> None:
        """The fakes come from a key of each database: nobody can compute them."""
        one = self.populated()
        two = self.populated()
        self.assertNotEqual(
            one.scram_credentials("nobody@example.org"),
            two.scram_credentials("nobody@example.org"),
        )

    def test_unreadable_credentials_give_the_fake(self) -> None:
        directory = self.populated()
        fake = directory.scram_credentials("nobody@example.org")
        with directory._transaction(write=True) as db:
            db.execute("UPDATE users SET scram = 'SCRAM-SHA-256$x'")
        credentials = directory.scram_credentials("alice@example.org")
        self.assertEqual(credentials.iterations, SCRAM_ITERATIONS)
        self.assertNotEqual(credentials, fake)
        self.assertFalse(scram_login(directory, "alice@example.org", "alice-password"))


class MigrationTests(DirectoryTestCase):
    """A database of schema 1 is upgraded in place."""

    def old_database(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        file = path / "directory.sqlite"
        hashed = cheap_hasher().hash("old-password")
        db = sqlite3.connect(file)
        db.executescript(SCHEMA_1)
        with db:
            db.execute("INSERT INTO domains VALUES ('example.org')")
            db.execute(
                "INSERT INTO users VALUES ('alice@example.org', 'example.org', ?, 'then')",
                (hashed,),
            )
            db.execute("INSERT INTO aliases VALUES ('sales@example.org', 'alice@example.org')")
        db.close()
        return file

    def test_upgrade(self) -> None:
        """
        Everything is kept, the version is now 2; the old account still logs in with PLAIN,
        but has no SCRAM credentials (a fake, like an unknown user's) until its password
        changes.
        """
        directory = self.open(self.old_database())
        (version,) = directory._db.execute("PRAGMA user_version").fetchone()
        self.assertEqual(version, SCHEMA_VERSION)
        self.assertEqual(SCHEMA_VERSION, 2)
        self.assertEqual(directory.list_users(), ["alice@example.org"])
        self.assertEqual(directory.resolve("sales@example.org"), ["alice@example.org"])
        self.assertTrue(directory.verify_password("alice@example.org", "old-password"))
        self.assertFalse(scram_login(directory, "alice@example.org", "old-password"))
        fake = directory.scram_credentials("alice@example.org")
        self.assertEqual(directory.scram_credentials("alice@example.org"), fake)
        directory.set_password("alice@example.org", "new-password")
        self.assertTrue(scram_login(directory, "alice@example.org", "new-password"))
        self.assertEqual(directory.list_senders(), [])

    def test_upgrade_once(self) -> None:
        """Reopening the upgraded database changes nothing (the fake key is kept)."""
        file = self.old_database()
        first = self.open(file)
        fake = first.scram_credentials("nobody@example.org")
        first.close()
        second = self.open(file)
        self.assertEqual(second.scram_credentials("nobody@example.org"), fake)


class SenderTests(DirectoryTestCase):
    """Extra sender addresses: add, remove, list."""

    def test_add_list_remove(self) -> None:
        directory = self.populated()
        directory.add_user("bob@example.org", "pw")
        directory.add_sender("Alice@example.org", "Boss@Example.org")
        directory.add_sender("alice@example.org", "@Partner.example")
        directory.add_sender("bob@example.org", "bob@elsewhere.example")
        self.assertEqual(
            directory.list_senders(),
            [
                ("alice@example.org", "@partner.example"),
                ("alice@example.org", "boss@example.org"),
                ("bob@example.org", "bob@elsewhere.example"),
            ],
        )
        self.assertEqual(
            directory.list_senders("BOB@example.org"),
            [("bob@example.org", "bob@elsewhere.example")],
        )
        directory.remove_sender("alice@example.org", "boss@example.org")
        self.assertEqual(
            directory.list_senders("alice@example.org"),
            [("alice@example.org", "@partner.example")],
        )

    def test_refusals(self) -> None:
        directory = self.populated()
        directory.add_sender("alice@example.org", "boss@example.org")
        e = self.assertRaises(
            DirectoryError, directory.add_sender, "alice@example.org", "boss@example.org"
        )
        self.assertIn("already", str(e))
        self.assertRaises(DirectoryError, directory.add_sender, "bob@example.org", "x@example.org")
        self.assertRaises(DirectoryError, directory.add_sender, "alice@example.org", "not valid")
        self.assertRaises(
            DirectoryError, directory.remove_sender, "alice@example.org", "x@example.org"
        )

    def test_removed_with_the_user(self) -> None:
        directory = self.populated()
        directory.add_sender("alice@example.org", "boss@example.org")
        directory.remove_user("alice@example.org")
        self.assertEqual(directory.list_senders(), [])


class MaySendAsTests(DirectoryTestCase):
    """L{SQLiteDirectory.may_send_as}."""

    def setUp(self) -> None:
        self.directory = self.populated()
        d = self.directory
        d.add_domain("example.net")
        d.add_user("bob@example.org", "pw")
        d.add_alias("sales@example.org", "alice@example.org")
        d.add_alias("sales@example.org", "bob@example.org")
        d.add_alias("info@example.org", "sales@example.org")
        d.add_alias("@example.net", "alice@example.org")
        d.add_user("carol@example.net", "pw")

    def test_own_address(self) -> None:
        self.assertTrue(self.directory.may_send_as("alice@example.org", "alice@example.org"))
        self.assertTrue(self.directory.may_send_as("alice@example.org", "ALICE@Example.ORG"))

    def test_plus_address(self) -> None:
        self.assertTrue(self.directory.may_send_as("alice@example.org", "alice+lists@example.org"))
        self.assertFalse(self.directory.may_send_as("bob@example.org", "alice+bob@example.org"))

    def test_alias(self) -> None:
        """Every target of an alias may send as it, also through a chain of aliases."""
        for account in ("alice@example.org", "bob@example.org"):
            self.assertTrue(self.directory.may_send_as(account, "sales@example.org"))
            self.assertTrue(self.directory.may_send_as(account, "info@example.org"))
            self.assertTrue(self.directory.may_send_as(account, "sales+x@example.org"))

    def test_catch_all(self) -> None:
        """
        The catch-all's target may send as any address it covers, not as an account of
        that domain (mail to it does not reach the catch-all).
        """
        self.assertTrue(self.directory.may_send_as("alice@example.org", "anything@example.net"))
        self.assertFalse(self.directory.may_send_as("bob@example.org", "anything@example.net"))
        self.assertFalse(self.directory.may_send_as("alice@example.org", "carol@example.net"))

    def test_extra_senders(self) -> None:
        d = self.directory
        self.assertFalse(d.may_send_as("bob@example.org", "boss@example.org"))
        d.add_sender("bob@example.org", "boss@example.org")
        d.add_sender("bob@example.org", "@partner.example")
        d.add_sender("bob@example.org", "bob@gmail.example")
        self.assertTrue(d.may_send_as("bob@example.org", "Boss@example.org"))
        self.assertTrue(d.may_send_as("bob@example.org", "boss+x@example.org"))
        self.assertTrue(d.may_send_as("bob@example.org", "anyone@partner.example"))
        self.assertTrue(d.may_send_as("bob@example.org", "bob@gmail.example"))
        self.assertFalse(d.may_send_as("bob@example.org", "anyone@sub.partner.example"))
        self.assertFalse(d.may_send_as("alice@example.org", "boss@example.org"))
        d.remove_sender("bob@example.org", "boss@example.org")
        self.assertFalse(d.may_send_as("bob@example.org", "boss@example.org"))

    def test_other_users_address_refused(self) -> None:
        d = self.directory
        self.assertFalse(d.may_send_as("bob@example.org", "alice@example.org"))
        self.assertFalse(d.may_send_as("alice@example.org", "bob@example.org"))
        self.assertFalse(d.may_send_as("alice@example.org", "nobody@example.org"))
        self.assertFalse(d.may_send_as("alice@example.org", "alice@remote.example"))

    def test_no_null_sender_and_no_bad_names(self) -> None:
        d = self.directory
        self.assertFalse(d.may_send_as("alice@example.org", ""))
        self.assertFalse(d.may_send_as("alice@example.org", "not an address"))
        self.assertFalse(d.may_send_as("nobody@example.org", "nobody@example.org"))
        self.assertFalse(d.may_send_as("", "alice@example.org"))

    def test_changes_seen_within_recheck(self) -> None:
        """
        A change made by another connection (the CLI) applies once C{recheck} seconds have
        passed since the database was last asked (answers in between come from the cache);
        this connection's own changes apply at once.
        """
        now = [100.0]
        d = SQLiteDirectory(
            self.directory.path,
            "example.org",
            hasher=cheap_hasher(),
            recheck=1.0,
            monotonic=lambda: now[0],
        )
        self.addCleanup(d.close)
        self.assertFalse(d.may_send_as("bob@example.org", "boss@example.org"))
        other = SQLiteDirectory(d.path, "example.org", hasher=cheap_hasher())
        other.add_sender("bob@example.org", "boss@example.org")
        other.close()
        now[0] += 0.5
        self.assertFalse(d.may_send_as("bob@example.org", "boss@example.org"))
        now[0] += 0.5
        self.assertTrue(d.may_send_as("bob@example.org", "boss@example.org"))
        d.remove_sender("bob@example.org", "boss@example.org")
        self.assertFalse(d.may_send_as("bob@example.org", "boss@example.org"))
