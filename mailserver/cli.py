# -*- test-case-name: tests.test_cli -*-
"""
The admin command line: C{mailserver user|domain|alias|sender|queue|config ...}.

It changes the directory database directly; a running server sees the changes at its next
look-up. Passwords are read from a prompt or, with C{--password-stdin}, from standard input,
never from the arguments (which other local users can see in the process list).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mailserver import config as configmodule
from mailserver.config import Config, ConfigError
from mailserver.directory import (
    RECHECK,
    DirectoryError,
    SQLiteDirectory,
    normalize_address,
    normalize_alias_source,
    normalize_domain,
    open_directory,
)
from mailserver.queue.spool import (
    ALL,
    CorruptEntry,
    QueueEntry,
    RecipientState,
    Spool,
    UnknownEntry,
    mark_due,
    release_lock,
    try_lock,
)

EX_USAGE = 2
"""What argparse returns for bad arguments."""
EX_CONFIG = 78
"""sysexits.h: the configuration is not valid."""
MIN_PASSWORD_LENGTH = 8

Prompt = Callable[[str], str]


class CommandError(Exception):
    """A command failed; the message is printed after C{mailserver: }."""


@dataclass(frozen=True)
class Console:
    """The streams and password prompt a command uses (replaced in tests)."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    prompt: Prompt

    def say(self, line: str) -> None:
        print(line, file=self.stdout)

    def complain(self, line: str) -> None:
        print(line, file=self.stderr)


# -- the parser ------------------------------------------------------------------------------


def _add_config_option(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS on sub-parsers: they only set the value when given there, so that
    # "--config X user list" and "user list --config X" both work.
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help="configuration file (default: the embedded default, data under ./var)",
    )


def _subcommand(
    group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=summary, description=summary)
    _add_config_option(parser)
    return parser


def _add_user_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = _subcommand(group, "user", "manage accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(users, "add", "create an account")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(run=_user_add)
    p = _subcommand(users, "del", "delete an account")
    p.add_argument("address", metavar="ADDRESS")
    p.set_defaults(run=_user_del)
    p = _subcommand(users, "passwd", "change an account's password")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(run=_user_passwd)
    p = _subcommand(users, "list", "list accounts")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain's accounts")
    p.set_defaults(run=_user_list)


def _add_domain_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    domains = _subcommand(group, "domain", "manage local domains").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(domains, "add", "add a local domain")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_domain_add)
    p = _subcommand(domains, "del", "remove a local domain (it must have no users or aliases)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=_domain_del)
    p = _subcommand(domains, "list", "list local domains")
    p.set_defaults(run=_domain_list)


def _add_alias_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    aliases = _subcommand(group, "alias", "manage aliases").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(aliases, "add", "add an alias target")
    p.add_argument("source", metavar="SOURCE", help="local@domain, or @domain for a catch-all")
    p.add_argument("target", metavar="TARGET", help="an address, local or remote")
    p.set_defaults(run=_alias_add)
    p = _subcommand(aliases, "del", "remove one target of an alias, or all of them")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET", nargs="?")
    p.set_defaults(run=_alias_del)
    p = _subcommand(aliases, "list", "list aliases")
    p.set_defaults(run=_alias_list)


def _add_sender_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    senders = _subcommand(
        group, "sender", "extra addresses an account may send as (submission)"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _subcommand(senders, "add", "let an account send as another address")
    p.add_argument("account", metavar="ACCOUNT", help="local@domain of an existing account")
    p.add_argument("address", metavar="ADDRESS", help="an address, or @domain for all of it")
    p.set_defaults(run=_sender_add)
    p = _subcommand(senders, "del", "take such a permission back")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("address", metavar="ADDRESS")
    p.set_defaults(run=_sender_del)
    p = _subcommand(senders, "list", "list the extra sender addresses")
    p.add_argument("account", metavar="ACCOUNT", nargs="?", help="only this account's")
    p.set_defaults(run=_sender_list)


def _add_config_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    configs = _subcommand(group, "config", "configuration file").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(configs, "check", "check a configuration and print the effective one")
    p.add_argument("path", metavar="PATH", nargs="?", help="the file (or give --config)")


def _add_queue_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = _subcommand(group, "queue", "inspect and manage the outbound queue").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(queue, "list", "list queued messages and their recipients")
    p.set_defaults(run=_queue_list)
    p = _subcommand(queue, "show", "show a queued message's envelope and headers")
    p.add_argument("queue_id", metavar="ID")
    p.set_defaults(run=_queue_show)
    p = _subcommand(queue, "retry", "try a queued message (or all of them) again now")
    p.add_argument("queue_id", metavar="ID", nargs="?", help="default: every message")
    p.set_defaults(run=_queue_retry)
    p = _subcommand(queue, "delete", "remove a queued message, without a notice to its sender")
    p.add_argument("queue_id", metavar="ID")
    p.set_defaults(run=_queue_delete)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the C{mailserver} command."""
    parser = argparse.ArgumentParser(
        prog="mailserver", description="Administer the mail server's directory."
    )
    _add_config_option(parser, top=True)
    group = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_user_commands(group)
    _add_domain_commands(group)
    _add_alias_commands(group)
    _add_sender_commands(group)
    _add_config_commands(group)
    _add_queue_commands(group)
    return parser


def _parse(argv: Sequence[str], console: Console) -> argparse.Namespace | int:
    """
    @return: the parsed arguments, or the exit code when argparse stopped (C{--help}, a usage
        error): argparse prints to C{sys.stdout}/C{sys.stderr} and exits, so both are caught.
    """
    with redirect_stdout(console.stdout), redirect_stderr(console.stderr):
        try:
            return build_parser().parse_args(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EX_USAGE)


# -- helpers ---------------------------------------------------------------------------------


def _load_config(path: str | None) -> Config:
    """@raise ConfigError: the file is not valid."""
    if path is None:
        return configmodule.embedded_default()
    return configmodule.load(path)


def _read_password(args: argparse.Namespace, console: Console) -> str:
    """
    Read a new password from stdin (C{--password-stdin}) or the prompt, asked twice.

    @raise CommandError: no password, mismatch, or too short.
    """
    try:
        if args.password_stdin:
            password = console.stdin.readline().removesuffix("\n").removesuffix("\r")
        else:
            password = console.prompt("New password: ")
            if console.prompt("New password (again): ") != password:
                raise CommandError("the passwords do not match")
    except EOFError:
        raise CommandError("no password given")
    if not password:
        raise CommandError("the password must not be empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CommandError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    return password


# -- the commands ----------------------------------------------------------------------------

Command = Callable[[SQLiteDirectory, argparse.Namespace, Console], None]


def _user_add(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    address = normalize_address(args.address)
    domain = address.rpartition("@")[2]
    # Checked before asking for the password, so the admin does not type it in vain.
    if not directory.is_local_domain(domain):
        raise CommandError(
            f"domain {domain} does not exist: run `mailserver domain add {domain}` first"
        )
    if directory.user_exists(address):
        raise CommandError(f"user {address} exists")
    directory.add_user(address, _read_password(args, console))
    console.say(f"added user {address}")


def _user_del(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    address = normalize_address(args.address)
    directory.remove_user(address)
    console.say(f"removed user {address}")


def _user_passwd(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    address = normalize_address(args.address)
    if not directory.user_exists(address):
        raise CommandError(f"user {address} does not exist")
    directory.set_password(address, _read_password(args, console))
    console.say(f"changed the password of {address}")


def _user_list(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    for address in directory.list_users(args.domain):
        console.say(address)


def _domain_add(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    name = normalize_domain(args.name)
    directory.add_domain(name)
    console.say(f"added domain {name}")


def _domain_del(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    name = normalize_domain(args.name)
    directory.remove_domain(name)
    console.say(f"removed domain {name}")


def _domain_list(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    for name in directory.list_domains():
        console.say(name)


def _alias_add(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    directory.add_alias(args.source, args.target)
    console.say(f"added alias {_show_alias(args.source, args.target)}")


def _alias_del(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    directory.remove_alias(args.source, args.target)
    if args.target is None:
        console.say(f"removed alias {normalize_alias_source(args.source)}")
    else:
        console.say(f"removed alias {_show_alias(args.source, args.target)}")


def _alias_list(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    for source, target in directory.list_aliases():
        console.say(f"{source} -> {target}")


def _sender_add(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    directory.add_sender(args.account, args.address)
    console.say(_show_sender(args.account, "may now send as", args.address))


def _sender_del(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    directory.remove_sender(args.account, args.address)
    console.say(_show_sender(args.account, "may no longer send as", args.address))


def _sender_list(directory: SQLiteDirectory, args: argparse.Namespace, console: Console) -> None:
    for account, address in directory.list_senders(args.account):
        console.say(f"{account} -> {address}")


def _show_sender(account: str, verb: str, address: str) -> str:
    return f"{normalize_address(account)} {verb} {normalize_alias_source(address)}"


def _show_alias(source: str, target: str) -> str:
    return f"{normalize_alias_source(source)} -> {normalize_address(target)}"


def _config_check(args: argparse.Namespace, console: Console) -> int:
    """Print the effective configuration, or every error of the file."""
    path: str | None = args.path
    if path is not None and args.config is not None and path != args.config:
        console.complain("mailserver: config check: give PATH or --config, not both")
        return EX_USAGE
    config = _config_or_complain(path if path is not None else args.config, console)
    if config is None:
        return EX_CONFIG
    console.stdout.write(configmodule.render(config))
    return 0


def _config_or_complain(path: str | None, console: Console) -> Config | None:
    """The configuration at C{path} (None: the embedded default), or None once its errors are
    on stderr."""
    try:
        return _load_config(path)
    except ConfigError as e:
        for error in e.errors:
            console.complain(error)
        return None


def _run_directory_command(command: Command, args: argparse.Namespace, console: Console) -> int:
    config = _config_or_complain(args.config, console)
    if config is None:
        return EX_CONFIG
    try:
        directory = open_directory(config.server.data_dir, config.server.domain)
        try:
            command(directory, args, console)
        finally:
            directory.close()
        if getattr(args, "action", "list") != "list" and _server_running(config.server.data_dir):
            # A running server asks for changes by others at most every RECHECK seconds:
            # when this command returns, the server sees the change.
            time.sleep(RECHECK)
    except (CommandError, DirectoryError) as e:
        console.complain(f"mailserver: {e}")
        return 1
    except sqlite3.Error as e:
        console.complain(f"mailserver: directory database error: {e}")
        return 1
    return 0


def _server_running(data_dir: Path) -> bool:
    """Whether a server runs on C{data_dir} (it holds the queue's lock while it runs)."""
    queue = data_dir / "queue"
    if not queue.is_dir():
        return False
    try:
        fd = try_lock(queue / ".lock")
    except OSError:
        return False
    if fd is None:
        return True
    release_lock(fd)
    return False


# -- the queue -------------------------------------------------------------------------------

QUEUE_REQUEST_WAIT = 10.0
"""Seconds C{queue retry|delete} waits for a running server to take its request."""

QueueCommand = Callable[[Spool, argparse.Namespace, Console], None]


def _run_queue_command(command: QueueCommand, args: argparse.Namespace, console: Console) -> int:
    config = _config_or_complain(args.config, console)
    if config is None:
        return EX_CONFIG
    try:
        command(Spool(config.server.data_dir / "queue"), args, console)
    except CommandError as e:
        console.complain(f"mailserver: {e}")
        return 1
    except OSError as e:
        console.complain(f"mailserver: queue: {e}")
        return 1
    return 0


def _queue_list(spool: Spool, args: argparse.Namespace, console: Console) -> None:
    """One paragraph per message, like C{postqueue -p}."""
    entries, bad = spool.scan()
    for queue_id, reason in bad:
        console.complain(f"mailserver: {queue_id}: unreadable envelope: {reason}")
    if not entries:
        console.say("Queue is empty")
        return
    console.say(f"{'Queue ID':<20} {'Size':>9}  {'Arrival time':<19}  Sender/Recipient")
    for entry in entries:
        arrival = _queue_time(entry.received)
        sender = _printable(entry.sender)
        console.say(f"{entry.queue_id:<20} {entry.size:>9}  {arrival}  <{sender}>")
        for r in entry.recipients:
            console.say(f"    <{_printable(r.address)}>  {_recipient_status(entry, r)}")
            if r.code or r.text:
                console.say(f"        last reply: {_last_reply(r)}")
        console.say("")
    total = sum(e.size for e in entries)
    console.say(f"-- {len(entries)} message(s), {total} octets")


def _queue_show(spool: Spool, args: argparse.Namespace, console: Console) -> None:
    """The envelope in full, then the header block of the message."""
    entry = _read_entry(spool, args.queue_id)
    fields = [
        ("Queue ID", entry.queue_id),
        ("Sender", f"<{entry.sender}>"),
        ("Arrival time", _queue_time(entry.received)),
        ("Size", f"{entry.size} octets"),
        ("Envelope ID", entry.envid or "(none)"),
        ("RET", entry.ret or "(not given)"),
        ("SMTPUTF8", "yes" if entry.smtputf8 else "no"),
        ("8BITMIME", "yes" if entry.eight_bit else "no"),
        ("Delay notice", "sent" if entry.delay_notified else "not sent"),
    ]
    for name, value in fields:
        console.say(f"{name + ':':<14} {_printable(value)}")
    for r in entry.recipients:
        console.say(f"Recipient <{_printable(r.address)}>")
        notify = "(default)" if r.rcpt.notify is None else ",".join(sorted(r.rcpt.notify))
        console.say(f"    state:       {_recipient_status(entry, r)}")
        console.say(f"    NOTIFY:      {notify}")
        if r.rcpt.orcpt:
            console.say(f"    ORCPT:       {_printable(r.rcpt.orcpt)}")
        if r.code or r.text:
            console.say(f"    last reply:  {_last_reply(r)}")
        if r.notice:
            console.say(f"    notice owed: {r.notice}")
    console.say("")
    try:
        header = spool.header_block(entry)
    except FileNotFoundError:
        raise CommandError(f"{entry.queue_id}: the message file is missing")
    for line in header.decode("utf-8", "replace").split("\r\n"):
        if line:
            console.say(_printable(line))


def _queue_retry(spool: Spool, args: argparse.Namespace, console: Console) -> None:
    queue_id: str | None = args.queue_id
    if queue_id is not None:
        _read_entry(spool, queue_id)
    elif not spool.root.is_dir():
        console.say("Queue is empty")
        return
    fd = try_lock(spool.lock_path)
    if fd is None:
        _ask_server(spool, "retry", queue_id or ALL)
        console.say(
            f"{queue_id}: the server is trying it now"
            if queue_id
            else "the server is trying every queued message now"
        )
        return
    try:
        entries = [_read_entry(spool, queue_id)] if queue_id else spool.scan()[0]
        mark_due(entries, time.time())
        for entry in entries:
            spool.save(entry)
    finally:
        release_lock(fd)
    what = queue_id if queue_id else f"{len(entries)} message(s)"
    console.say(f"{what}: due now; no server is running, so at its next start")


def _queue_delete(spool: Spool, args: argparse.Namespace, console: Console) -> None:
    queue_id: str = args.queue_id
    _read_entry(spool, queue_id)
    fd = try_lock(spool.lock_path)
    if fd is None:
        _ask_server(spool, "delete", queue_id)
        if spool.exists(queue_id):
            raise CommandError(f"{queue_id}: the server did not delete it")
    else:
        try:
            spool.remove(queue_id)
        finally:
            release_lock(fd)
    console.say(f"{queue_id}: deleted")


def _read_entry(spool: Spool, queue_id: str) -> QueueEntry:
    try:
        return spool.read(queue_id)
    except UnknownEntry:
        raise CommandError(f"no queue entry {queue_id}")
    except CorruptEntry as e:
        raise CommandError(f"{queue_id}: unreadable envelope: {e}")


def _ask_server(spool: Spool, action: str, target: str) -> None:
    """
    Leave a request for the running server and wait (at most L{QUEUE_REQUEST_WAIT}) until it
    has acted on it (it unlinks the request then).

    @raise CommandError: it did not; the request is withdrawn.
    """
    path = spool.write_request(action, target)
    deadline = time.monotonic() + QUEUE_REQUEST_WAIT
    while os.path.lexists(path):
        if time.monotonic() >= deadline:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return  # taken at the last moment
            raise CommandError(
                f"the server did not take the request within {QUEUE_REQUEST_WAIT:g} s; "
                "nothing was done"
            )
        time.sleep(0.05)


def _recipient_status(entry: QueueEntry, r: RecipientState) -> str:
    if r.state != "pending":
        return r.state + (" (expired)" if r.expired else "")
    state = entry.domains.get(r.domain)
    if state is None:
        return "pending"
    return f"pending, attempts {state.attempts}, next try {_queue_time(state.next_try)}"


def _last_reply(r: RecipientState) -> str:
    reply = f"{r.code} {r.text}" if r.code else r.text
    return _printable(reply + (f" (from {r.host})" if r.host else ""))


def _queue_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _printable(text: str) -> str:
    """C{text} with control characters escaped (headers and replies come from strangers)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else repr(ch)[1:-1] for ch in text)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: Prompt | None = None,
) -> int:
    """
    Run the C{mailserver} command.

    @param argv: the arguments, without the program name (default: C{sys.argv[1:]}).
    @param stdin: read by C{--password-stdin} (default: C{sys.stdin}).
    @param prompt: asks for a password without echo (default: C{getpass.getpass}).
    @return: the exit code: 0 done, 1 refused, 2 bad usage, 78 bad configuration.
    """
    console = Console(
        stdin=stdin if stdin is not None else sys.stdin,
        stdout=stdout if stdout is not None else sys.stdout,
        stderr=stderr if stderr is not None else sys.stderr,
        prompt=prompt if prompt is not None else getpass.getpass,
    )
    args = _parse(sys.argv[1:] if argv is None else argv, console)
    if isinstance(args, int):
        return args
    try:
        if args.command == "config":
            return _config_check(args, console)
        if args.command == "queue":
            return _run_queue_command(args.run, args, console)
        return _run_directory_command(args.run, args, console)
    except KeyboardInterrupt:
        console.complain("mailserver: interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
