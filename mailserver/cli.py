# -*- test-case-name: tests.test_cli -*-
"""
The admin command line: C{mailserver user|domain|alias|config ...}.

It changes the directory database directly; a running server sees the changes at its next
look-up. Passwords are read from a prompt or, with C{--password-stdin}, from standard input,
never from the arguments (which other local users can see in the process list).
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import TextIO

from mailserver import config as configmodule
from mailserver.config import Config, ConfigError
from mailserver.directory import (
    DirectoryError,
    SQLiteDirectory,
    normalize_address,
    normalize_alias_source,
    normalize_domain,
    open_directory,
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


def _add_config_commands(group: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    configs = _subcommand(group, "config", "configuration file").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = _subcommand(configs, "check", "check a configuration and print the effective one")
    p.add_argument("path", metavar="PATH", nargs="?", help="the file (or give --config)")


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
    _add_config_commands(group)
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


def _show_alias(source: str, target: str) -> str:
    return f"{normalize_alias_source(source)} -> {normalize_address(target)}"


def _config_check(args: argparse.Namespace, console: Console) -> int:
    """Print the effective configuration, or every error of the file."""
    path: str | None = args.path
    if path is not None and args.config is not None and path != args.config:
        console.complain("mailserver: config check: give PATH or --config, not both")
        return EX_USAGE
    try:
        config = _load_config(path if path is not None else args.config)
    except ConfigError as e:
        for error in e.errors:
            console.complain(error)
        return EX_CONFIG
    console.stdout.write(configmodule.render(config))
    return 0


def _run_directory_command(command: Command, args: argparse.Namespace, console: Console) -> int:
    try:
        config = _load_config(args.config)
    except ConfigError as e:
        for error in e.errors:
            console.complain(error)
        return EX_CONFIG
    try:
        directory = open_directory(config.server.data_dir, config.server.domain)
        try:
            command(directory, args, console)
        finally:
            directory.close()
    except (CommandError, DirectoryError) as e:
        console.complain(f"mailserver: {e}")
        return 1
    except sqlite3.Error as e:
        console.complain(f"mailserver: directory database error: {e}")
        return 1
    return 0


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
        return _run_directory_command(args.run, args, console)
    except KeyboardInterrupt:
        console.complain("mailserver: interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
