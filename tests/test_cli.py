"""Tests for L{mailserver.cli}."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from twisted.internet.defer import succeed
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

import mailserver
from mailserver import cli
from mailserver import config as configmodule
from mailserver.cli import EX_CONFIG, main
from mailserver.config import QueueConfig
from mailserver.directory import RECHECK, SQLiteDirectory, open_directory
from mailserver.queue.model import QueuedRecipient, Submission
from mailserver.queue.service import QueueService
from mailserver.queue.spool import QueueEntry, Spool, release_lock, try_lock
from mailserver.store.body import MessageBody

PASSWORD = "Correct-Horse-9"

CONFIG = """\
[server]
data_dir = "{data_dir}"
domain = "example.org"

[[listener]]
kind = "smtp"
endpoint = "tcp:0"
"""


class Result:
    """What one run of L{main} did."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return f"Result({self.code!r}, out={self.out!r}, err={self.err!r})"


class CLITestCase(SynchronousTestCase):
    """Runs L{main} against a configuration in a temporary directory."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.data_dir = self.root / "data"
        self.config = self.root / "mailserver.toml"
        self.config.write_text(CONFIG.format(data_dir=self.data_dir))
        self.prompts: list[str] = []
        self.answers: list[str] = []

    def prompt(self, text: str) -> str:
        self.prompts.append(text)
        if not self.answers:
            raise EOFError()
        return self.answers.pop(0)

    def cli(self, *argv: str, stdin: str = "", config: bool = True) -> Result:
        """Run C{mailserver [--config FILE] argv...}."""
        out, err = io.StringIO(), io.StringIO()
        args = ["--config", str(self.config), *argv] if config else list(argv)
        code = main(args, stdin=io.StringIO(stdin), stdout=out, stderr=err, prompt=self.prompt)
        return Result(code, out.getvalue(), err.getvalue())

    def ok(self, *argv: str, stdin: str = "") -> str:
        """Run a command that must succeed; return its output."""
        result = self.cli(*argv, stdin=stdin)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.err, "")
        return result.out

    def fails(self, code: int, *argv: str, stdin: str = "") -> str:
        """Run a command that must fail with C{code}; return its error output."""
        result = self.cli(*argv, stdin=stdin)
        self.assertEqual(result.code, code, result)
        return result.err

    def directory(self, recheck: float = 0.0) -> SQLiteDirectory:
        """The directory as the server opens it (asking for other processes' changes every
        C{recheck} seconds: by default at each look-up)."""
        directory = open_directory(self.data_dir, "example.org", recheck=recheck)
        self.addCleanup(directory.close)
        return directory

    def with_domain(self) -> None:
        self.ok("domain", "add", "example.org")


class UserTests(CLITestCase):
    """C{mailserver user ...}."""

    def test_add_password_stdin(self) -> None:
        """C{user add --password-stdin} reads the password from stdin and creates the user."""
        self.with_domain()
        out = self.ok("user", "add", "Alice@Example.org", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(out, "added user alice@example.org\n")
        self.assertTrue(self.directory().verify_password("alice@example.org", PASSWORD))
        self.assertEqual(self.prompts, [])

    def test_stdin_crlf(self) -> None:
        """The line ending, CRLF too, is not part of the password."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD + "\r\n")
        self.assertTrue(self.directory().verify_password("alice@example.org", PASSWORD))

    def test_stdin_keeps_spaces(self) -> None:
        """Only the line ending is removed: spaces belong to the password."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=f" {PASSWORD} \n")
        self.assertTrue(self.directory().verify_password("alice@example.org", f" {PASSWORD} "))

    def test_add_prompt(self) -> None:
        """Without C{--password-stdin} the password is asked twice at the prompt."""
        self.with_domain()
        self.answers = [PASSWORD, PASSWORD]
        self.ok("user", "add", "alice@example.org")
        self.assertEqual(len(self.prompts), 2)
        self.assertTrue(self.directory().verify_password("alice@example.org", PASSWORD))

    def test_prompt_mismatch(self) -> None:
        """Two different answers at the prompt are refused; no user is created."""
        self.with_domain()
        self.answers = [PASSWORD, PASSWORD + "x"]
        err = self.fails(1, "user", "add", "alice@example.org")
        self.assertEqual(err, "mailserver: the passwords do not match\n")
        self.assertEqual(self.directory().list_users(), [])

    def test_prompt_eof(self) -> None:
        """End of input at the prompt is an error, not a traceback."""
        self.with_domain()
        err = self.fails(1, "user", "add", "alice@example.org")
        self.assertEqual(err, "mailserver: no password given\n")

    def test_empty_password(self) -> None:
        """An empty password is refused."""
        self.with_domain()
        err = self.fails(1, "user", "add", "alice@example.org", "--password-stdin", stdin="\n")
        self.assertEqual(err, "mailserver: the password must not be empty\n")
        err = self.fails(1, "user", "add", "alice@example.org", "--password-stdin", stdin="")
        self.assertEqual(err, "mailserver: the password must not be empty\n")

    def test_short_password(self) -> None:
        """A password of fewer than 8 characters is refused; 8 is enough."""
        self.with_domain()
        err = self.fails(1, "user", "add", "alice@example.org", "--password-stdin", stdin="1234567")
        self.assertIn("at least 8 characters", err)
        self.assertEqual(self.directory().list_users(), [])
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin="12345678")

    def test_no_password_argument(self) -> None:
        """
        There is no way to give a password in the arguments (where other users could see it):
        such an option is a usage error and the help offers none.
        """
        self.with_domain()
        result = self.cli("user", "add", "alice@example.org", "--password", PASSWORD)
        self.assertEqual(result.code, 2)
        self.assertIn("unrecognized arguments", result.err)
        self.assertEqual(self.directory().list_users(), [])
        for command in ("add", "passwd"):
            help_text = self.ok("user", command, "--help")
            self.assertIn("--password-stdin", help_text)
            self.assertNotIn("--password ", help_text)
            self.assertNotIn("--password=", help_text)

    def test_password_not_printed(self) -> None:
        """The password appears in no output."""
        self.with_domain()
        result = self.cli("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        self.assertNotIn(PASSWORD, result.out + result.err)
        result = self.cli("user", "passwd", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        self.assertNotIn(PASSWORD, result.out + result.err)

    def test_add_unknown_domain(self) -> None:
        """Adding a user to a domain that does not exist says to add the domain first."""
        err = self.fails(1, "user", "add", "alice@example.net", "--password-stdin", stdin=PASSWORD)
        self.assertIn("mailserver domain add example.net", err)
        self.assertTrue(err.startswith("mailserver: "), err)

    def test_add_unknown_domain_no_prompt(self) -> None:
        """The domain is checked before the password is asked."""
        self.cli("user", "add", "alice@example.net")
        self.assertEqual(self.prompts, [])

    def test_add_existing(self) -> None:
        """Adding an existing user fails with exit code 1."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        err = self.fails(1, "user", "add", "ALICE@example.org", "--password-stdin", stdin=PASSWORD)
        self.assertEqual(err, "mailserver: user alice@example.org exists\n")

    def test_add_bad_address(self) -> None:
        """A bad address fails with exit code 1 and the reason."""
        self.with_domain()
        err = self.fails(1, "user", "add", "a/b@example.org", "--password-stdin", stdin=PASSWORD)
        self.assertIn("slash", err)
        self.assertTrue(err.startswith("mailserver: "), err)

    def test_del(self) -> None:
        """C{user del} removes the user; an unknown user fails."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        self.assertEqual(
            self.ok("user", "del", "alice@example.org"), "removed user alice@example.org\n"
        )
        self.assertEqual(self.directory().list_users(), [])
        err = self.fails(1, "user", "del", "alice@example.org")
        self.assertEqual(err, "mailserver: user alice@example.org does not exist\n")

    def test_passwd(self) -> None:
        """C{user passwd} replaces the password."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        out = self.ok(
            "user", "passwd", "alice@example.org", "--password-stdin", stdin="new-password\n"
        )
        self.assertEqual(out, "changed the password of alice@example.org\n")
        directory = self.directory()
        self.assertTrue(directory.verify_password("alice@example.org", "new-password"))
        self.assertFalse(directory.verify_password("alice@example.org", PASSWORD))

    def test_passwd_unknown(self) -> None:
        """C{user passwd} of an unknown user fails before asking for a password."""
        self.with_domain()
        err = self.fails(1, "user", "passwd", "bob@example.org")
        self.assertEqual(err, "mailserver: user bob@example.org does not exist\n")
        self.assertEqual(self.prompts, [])

    def test_list(self) -> None:
        """C{user list} prints one address a line, optionally for one domain."""
        self.with_domain()
        self.ok("domain", "add", "example.net")
        for address in ("bob@example.org", "alice@example.org", "carol@example.net"):
            self.ok("user", "add", address, "--password-stdin", stdin=PASSWORD)
        self.assertEqual(
            self.ok("user", "list"), "alice@example.org\nbob@example.org\ncarol@example.net\n"
        )
        self.assertEqual(self.ok("user", "list", "example.net"), "carol@example.net\n")
        err = self.fails(1, "user", "list", "example.com")
        self.assertEqual(err, "mailserver: domain example.com does not exist\n")

    def test_seen_by_running_server(self) -> None:
        """A directory opened before (the running server) sees users the CLI adds (within
        its recheck time: a bounded wait here)."""
        self.with_domain()
        server = self.directory(recheck=0.2)
        self.assertEqual(server.resolve("alice@example.org"), [])
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        for _ in range(100):
            if server.resolve("alice@example.org"):
                break
            time.sleep(0.01)
        self.assertEqual(server.resolve("alice@example.org"), ["alice@example.org"])


class RunningServerWaitTests(CLITestCase):
    """A changing command returns only once a running server can see the change."""

    def timed(self, *argv: str, stdin: str = "") -> float:
        started = time.monotonic()
        self.ok(*argv, stdin=stdin)
        return time.monotonic() - started

    def test_waits_recheck_only_when_a_server_runs(self) -> None:
        """With the queue lock held (a server), `domain add` takes RECHECK; `list` does not;
        with no server, neither waits."""
        self.assertLess(self.timed("domain", "add", "a.example"), RECHECK)
        queue = self.data_dir / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        fd = try_lock(queue / ".lock")
        assert fd is not None
        self.addCleanup(release_lock, fd)
        self.assertGreaterEqual(self.timed("domain", "add", "b.example"), RECHECK)
        self.assertLess(self.timed("domain", "list"), RECHECK)


class DomainTests(CLITestCase):
    """C{mailserver domain ...}."""

    def test_add_list_del(self) -> None:
        """Domains are added, listed one a line, and removed."""
        self.assertEqual(self.ok("domain", "add", "Example.ORG"), "added domain example.org\n")
        self.ok("domain", "add", "a.example")
        self.assertEqual(self.ok("domain", "list"), "a.example\nexample.org\n")
        self.assertEqual(self.ok("domain", "del", "a.example"), "removed domain a.example\n")
        self.assertEqual(self.ok("domain", "list"), "example.org\n")

    def test_add_bad(self) -> None:
        """A bad domain name fails with exit code 1."""
        err = self.fails(1, "domain", "add", "exa_mple.org")
        self.assertTrue(err.startswith("mailserver: "), err)

    def test_del_with_users(self) -> None:
        """A domain with users cannot be removed."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD)
        err = self.fails(1, "domain", "del", "example.org")
        self.assertIn("still has 1 user", err)


class AliasTests(CLITestCase):
    """C{mailserver alias ...}."""

    def test_add_list_del(self) -> None:
        """Aliases are added, listed as C{source -> target}, and removed one by one or whole."""
        self.with_domain()
        self.assertEqual(
            self.ok("alias", "add", "Sales@example.org", "Bob@Remote.example"),
            "added alias sales@example.org -> bob@remote.example\n",
        )
        self.ok("alias", "add", "sales@example.org", "alice@example.org")
        self.ok("alias", "add", "@example.org", "alice@example.org")
        self.assertEqual(
            self.ok("alias", "list"),
            "@example.org -> alice@example.org\n"
            "sales@example.org -> alice@example.org\n"
            "sales@example.org -> bob@remote.example\n",
        )
        self.assertEqual(
            self.ok("alias", "del", "sales@example.org", "bob@remote.example"),
            "removed alias sales@example.org -> bob@remote.example\n",
        )
        self.assertEqual(self.ok("alias", "del", "@EXAMPLE.org"), "removed alias @example.org\n")
        self.assertEqual(self.ok("alias", "list"), "sales@example.org -> alice@example.org\n")

    def test_del_unknown(self) -> None:
        """Removing an alias that does not exist fails."""
        self.with_domain()
        err = self.fails(1, "alias", "del", "sales@example.org")
        self.assertEqual(err, "mailserver: alias sales@example.org does not exist\n")

    def test_add_nonlocal_source(self) -> None:
        """An alias source outside the local domains fails."""
        err = self.fails(1, "alias", "add", "sales@example.net", "a@example.org")
        self.assertEqual(err, "mailserver: domain example.net does not exist\n")


class SenderTests(CLITestCase):
    """C{mailserver sender ...}: extra addresses an account may submit mail as."""

    def test_add_list_del_and_effect(self) -> None:
        """Entries are added, listed, removed, and the directory's sender check follows them."""
        self.with_domain()
        self.ok("user", "add", "alice@example.org", "--password-stdin", stdin=PASSWORD + "\n")
        self.ok("user", "add", "bob@example.org", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(
            self.ok("sender", "add", "Alice@example.org", "Board@Elsewhere.example"),
            "alice@example.org may now send as board@elsewhere.example\n",
        )
        self.ok("sender", "add", "bob@example.org", "@lists.example")
        self.assertEqual(
            self.ok("sender", "list"),
            "alice@example.org -> board@elsewhere.example\nbob@example.org -> @lists.example\n",
        )
        self.assertEqual(
            self.ok("sender", "list", "bob@example.org"), "bob@example.org -> @lists.example\n"
        )
        directory = self.directory()
        self.assertTrue(directory.may_send_as("alice@example.org", "board@elsewhere.example"))
        self.assertTrue(directory.may_send_as("bob@example.org", "any@lists.example"))
        self.assertFalse(directory.may_send_as("bob@example.org", "board@elsewhere.example"))
        self.assertEqual(
            self.ok("sender", "del", "alice@example.org", "board@elsewhere.example"),
            "alice@example.org may no longer send as board@elsewhere.example\n",
        )
        self.assertFalse(directory.may_send_as("alice@example.org", "board@elsewhere.example"))

    def test_unknown_account_refused(self) -> None:
        """An entry for an account that does not exist is an error (exit 1)."""
        self.with_domain()
        err = self.fails(1, "sender", "add", "nobody@example.org", "x@example.net")
        self.assertIn("nobody@example.org", err)


class ConfigOptionTests(CLITestCase):
    """Where C{--config} goes, and what happens without it or with a bad file."""

    def test_positions(self) -> None:
        """C{--config} works before the command, between its words, and after it."""
        config = str(self.config)
        self.assertEqual(
            self.cli("--config", config, "domain", "add", "a.example", config=False).code, 0
        )
        self.assertEqual(
            self.cli("domain", "--config", config, "add", "b.example", config=False).code, 0
        )
        self.assertEqual(
            self.cli("domain", "add", "c.example", "--config", config, config=False).code, 0
        )
        result = self.cli("domain", "list", "--config", config, config=False)
        self.assertEqual(result.out, "a.example\nb.example\nc.example\n")

    def test_embedded_default(self) -> None:
        """Without C{--config} the data is under C{./var}."""
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.root)
        result = self.cli("domain", "add", "example.org", config=False)
        self.assertEqual(result.code, 0, result)
        self.assertTrue((self.root / "var" / "db" / "directory.sqlite").exists())

    def test_bad_config(self) -> None:
        """A directory command with an invalid configuration prints its errors and exits 78."""
        self.config.write_text(CONFIG.format(data_dir=self.data_dir) + "[limits]\nfoo = 1\n")
        err = self.fails(EX_CONFIG, "domain", "list")
        self.assertIn("limits.foo: unknown key", err)
        self.assertFalse(self.data_dir.exists())

    def test_missing_config(self) -> None:
        """A configuration file that does not exist exits 78."""
        result = self.cli("domain", "list", "--config", str(self.root / "nope.toml"), config=False)
        self.assertEqual(result.code, EX_CONFIG)
        self.assertIn("nope.toml", result.err)

    def test_usage(self) -> None:
        """No command, or an unknown one, is a usage error (2); C{--help} exits 0."""
        self.assertEqual(self.cli(config=False).code, 2)
        self.assertEqual(self.cli("frobnicate").code, 2)
        result = self.cli("--help", config=False)
        self.assertEqual(result.code, 0)
        self.assertIn("usage: mailserver", result.out)


class ConfigCheckTests(CLITestCase):
    """C{mailserver config check}."""

    def test_valid_path(self) -> None:
        """A valid file given as PATH prints the effective configuration and exits 0."""
        result = self.cli("config", "check", str(self.config), config=False)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.out, configmodule.render(configmodule.load(self.config)))
        self.assertIn(f'data_dir = "{self.data_dir}"', result.out)

    def test_valid_option(self) -> None:
        """The file may also be given with C{--config}, before or after the command."""
        expected = configmodule.render(configmodule.load(self.config))
        self.assertEqual(self.ok("config", "check"), expected)
        result = self.cli("config", "check", "--config", str(self.config), config=False)
        self.assertEqual(result.out, expected)

    def test_embedded(self) -> None:
        """Without a file the embedded default is checked."""
        result = self.cli("config", "check", config=False)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.out, configmodule.render(configmodule.embedded_default()))

    def test_invalid(self) -> None:
        """An invalid file prints every error, with the key's path, on stderr and exits 78."""
        self.config.write_text(
            CONFIG.format(data_dir=self.data_dir) + "[limits]\nbogus = 1\nrecipients = 0\n"
        )
        result = self.cli("config", "check", str(self.config), config=False)
        self.assertEqual(result.code, EX_CONFIG)
        self.assertEqual(result.out, "")
        self.assertIn("limits.bogus: unknown key", result.err)
        self.assertIn("limits.recipients", result.err)

    def test_both(self) -> None:
        """Two different files, as PATH and with C{--config}, is a usage error."""
        other = self.root / "other.toml"
        result = self.cli("config", "check", str(other))
        self.assertEqual(result.code, 2)
        self.assertIn("not both", result.err)


class ConsoleScriptTests(SynchronousTestCase):
    """The real command in a new process."""

    def test_python_m(self) -> None:
        """
        C{python -m mailserver.cli} adds a domain and a user with C{--password-stdin}; the
        password is in neither argv nor output, and it verifies.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        config = root / "mailserver.toml"
        config.write_text(CONFIG.format(data_dir=root / "data"))
        env = dict(os.environ)
        project = str(Path(mailserver.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [project, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "mailserver.cli", "--config", str(config)]

        def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*command, *argv], input=stdin, capture_output=True, text=True, env=env, timeout=120
            )

        done = run("domain", "add", "example.org")
        self.assertEqual(done.returncode, 0, done.stderr)
        argv = ["user", "add", "alice@example.org", "--password-stdin"]
        done = run(*argv, stdin=PASSWORD + "\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "added user alice@example.org\n")
        self.assertNotIn(PASSWORD, done.stdout + done.stderr + " ".join(argv))
        directory = open_directory(root / "data")
        self.addCleanup(directory.close)
        self.assertTrue(directory.verify_password("alice@example.org", PASSWORD))
        done = run("user", "add", "bob@example.net", "--password-stdin", stdin=PASSWORD)
        self.assertEqual(done.returncode, 1)
        self.assertIn("mailserver domain add example.net", done.stderr)


class QueueCommandTests(CLITestCase):
    """C{mailserver queue list|show|retry|delete} against a spool in the data directory."""

    def setUp(self) -> None:
        super().setUp()
        self.spool = Spool(self.data_dir / "queue")

    def queue(self, queue_id: str, *addresses: str, received: float = 1_700_000_000.0) -> None:
        """Put an entry in the spool, its first domain deferred twice."""
        self.spool.prepare()
        recipients = tuple(QueuedRecipient(a) for a in addresses or ("bob@example.net",))
        entry = QueueEntry.from_submission(
            Submission(queue_id, "alice@example.org", recipients, received, envid="e-1"),
            received,
        )
        first = entry.recipients[0]
        first.code, first.text, first.host = 451, "4.3.0 try later", "mx.example.net[192.0.2.1]"
        entry.domains[first.domain].attempts = 2
        entry.domains[first.domain].next_try = received + 360
        body = MessageBody()
        body.append(b"Subject: lunch\r\nX-Evil: \x1b[31mred\r\n\r\nShall we?\r\n")
        self.spool.store(entry, b"Received: by mail.example.org\r\n", body)

    def hold_lock(self) -> None:
        """Play a live server: hold the queue's lock."""
        self.spool.prepare()
        fd = try_lock(self.spool.lock_path)
        assert fd is not None
        self.addCleanup(release_lock, fd)

    def serve(self, act: Callable[[str, str], object]) -> threading.Thread:
        """Play a live server in a thread: act on the first control request, then unlink it."""

        def run() -> None:
            for _ in range(200):
                for name, action, target in self.spool.requests():
                    act(action, target)
                    self.spool.finish_request(name)
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=run)
        thread.start()
        self.addCleanup(thread.join)
        return thread

    def test_list_empty(self) -> None:
        """An empty queue (or none yet) says so and exits 0."""
        self.assertEqual(self.ok("queue", "list"), "Queue is empty\n")
        self.spool.prepare()
        self.assertEqual(self.ok("queue", "list"), "Queue is empty\n")

    def test_list(self) -> None:
        """One paragraph per message: id, size, arrival, sender, then each recipient."""
        self.queue("q1", "bob@example.net", "carol@example.com")
        self.queue("q2", received=1_700_000_100.0)
        out = self.ok("queue", "list")
        lines = out.splitlines()
        self.assertTrue(lines[1].startswith("q1 "), out)
        self.assertIn("<alice@example.org>", lines[1])
        self.assertIn(str(self.spool.read("q1").size), lines[1])
        self.assertIn("<bob@example.net>  pending, attempts 2, next try ", lines[2])
        self.assertEqual(
            lines[3].strip(), "last reply: 451 4.3.0 try later (from mx.example.net[192.0.2.1])"
        )
        self.assertIn("<carol@example.com>  pending, attempts 0", lines[4])
        self.assertIn("q2 ", out)
        self.assertTrue(lines[-1].startswith("-- 2 message(s), "), out)

    def test_list_reports_unreadable(self) -> None:
        """An unreadable envelope is named on stderr; the others are listed."""
        self.queue("q1")
        (self.spool.root / "bad.env").write_bytes(b"{")
        (self.spool.root / "bad.msg").write_bytes(b"x")
        result = self.cli("queue", "list")
        self.assertEqual(result.code, 0)
        self.assertIn("q1", result.out)
        self.assertIn("bad: unreadable envelope", result.err)

    def test_show(self) -> None:
        """The envelope in full and the message's header block, control characters escaped."""
        self.queue("q1")
        out = self.ok("queue", "show", "q1")
        for text in (
            "Queue ID:      q1",
            "Sender:        <alice@example.org>",
            "Envelope ID:   e-1",
            "Recipient <bob@example.net>",
            "NOTIFY:      (default)",
            "last reply:  451 4.3.0 try later (from mx.example.net[192.0.2.1])",
            "Received: by mail.example.org",
            "Subject: lunch",
            "X-Evil: \\x1b[31mred",
        ):
            self.assertIn(text, out)
        self.assertNotIn("Shall we?", out)
        self.assertNotIn("\x1b", out)

    def test_unknown_id(self) -> None:
        """An unknown (or unsafe) id is an error on stderr, exit 1, for every command."""
        self.queue("q1")
        for argv in (("show", "nope"), ("retry", "nope"), ("delete", "nope"), ("show", "../x")):
            err = self.fails(1, "queue", *argv)
            self.assertIn("no queue entry", err)
        self.assertTrue(self.spool.exists("q1"))

    def test_retry_without_server(self) -> None:
        """With no server running, retry marks the entry due now in the spool itself."""
        self.queue("q1")
        before = time.time()
        out = self.ok("queue", "retry", "q1")
        self.assertIn("q1: due now", out)
        state = self.spool.read("q1").domains["example.net"]
        self.assertGreaterEqual(state.next_try, before)
        self.assertLessEqual(state.next_try, time.time())
        self.assertEqual(state.attempts, 2)

    def test_retry_all_without_server(self) -> None:
        """C{retry} without an id marks every entry due."""
        self.queue("q1")
        self.queue("q2")
        self.assertIn("2 message(s): due now", self.ok("queue", "retry"))
        for q in ("q1", "q2"):
            self.assertLessEqual(self.spool.read(q).domains["example.net"].next_try, time.time())

    def test_delete_without_server(self) -> None:
        """With no server running, delete removes the entry's files."""
        self.queue("q1")
        self.assertEqual(self.ok("queue", "delete", "q1"), "q1: deleted\n")
        self.assertEqual(sorted(os.listdir(self.spool.root)), [".lock", "control", "corrupt"])

    def test_retry_with_server(self) -> None:
        """With a live server, retry leaves a request and reports once the server took it."""
        self.queue("q1")
        self.hold_lock()
        seen: list[tuple[str, str]] = []
        self.serve(lambda action, target: seen.append((action, target)))
        self.assertIn("q1: the server is trying it now", self.ok("queue", "retry", "q1"))
        self.assertEqual(seen, [("retry", "q1")])
        self.serve(lambda action, target: seen.append((action, target)))
        self.assertIn("every queued message", self.ok("queue", "retry"))
        self.assertEqual(seen[-1], ("retry", "ALL"))

    def test_delete_with_server(self) -> None:
        """With a live server, delete asks it and reports the entry gone."""
        self.queue("q1")
        self.hold_lock()
        self.serve(lambda action, target: self.spool.remove(target))
        self.assertEqual(self.ok("queue", "delete", "q1"), "q1: deleted\n")
        self.assertFalse(self.spool.exists("q1"))

    def test_server_not_answering(self) -> None:
        """A server that does not take the request in time: error, request withdrawn."""
        self.queue("q1")
        self.hold_lock()
        self.patch(cli, "QUEUE_REQUEST_WAIT", 0.2)
        err = self.fails(1, "queue", "delete", "q1")
        self.assertIn("did not take the request", err)
        self.assertEqual(self.spool.requests(), [])
        self.assertTrue(self.spool.exists("q1"))

    def test_delete_with_queue_service(self) -> None:
        """The CLI's request is carried out by a real L{QueueService} holding the lock."""
        from tests.test_queue_service import FakeOutbound, FakePool, FakeReactor

        self.queue("q1", received=0.0)
        reactor = FakeReactor()
        outbound = FakeOutbound()
        outbound.policy = None
        service = QueueService(
            self.spool.root,
            QueueConfig(),
            outbound,
            lambda i, r, m: succeed(None),
            "mail.example.org",
            reactor,
            cast(ThreadPool, FakePool()),
        )
        service.startService()

        def stop() -> None:
            service.stopService()
            reactor.advance(30)  # the grace period for the attempt left in flight

        self.addCleanup(stop)
        results: list[Result] = []
        thread = threading.Thread(target=lambda: results.append(self.cli("queue", "delete", "q1")))
        thread.start()
        for _ in range(400):
            if not thread.is_alive():
                break
            reactor.advance(1)
            time.sleep(0.01)
        thread.join()
        [result] = results
        self.assertEqual((result.code, result.out), (0, "q1: deleted\n"))
        self.assertIsNone(service.entry("q1"))
        self.assertFalse(self.spool.exists("q1"))
