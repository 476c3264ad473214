# -*- test-case-name: tests.test_config -*-
"""
The configuration: one TOML file parsed into frozen, typed dataclasses.

Every default lives here, once. Unknown keys and bad values are refused with the key's path and
the file's name; all errors of a file are reported together (L{ConfigError.errors}).
L{embedded_default} is the configuration used when no file is given.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from mailserver.queue.model import parse_next_hop

ListenerKind = Literal["smtp", "submission", "pop3", "imap"]
TLSMode = Literal["starttls", "implicit", "none"]

LISTENER_KINDS: tuple[str, ...] = ("smtp", "submission", "pop3", "imap")
RELAY_TLS_MODES: tuple[str, ...] = ("starttls", "implicit", "opportunistic", "none")
TLS_MODES: tuple[str, ...] = ("starttls", "implicit", "none")


class ConfigError(Exception):
    """
    A configuration could not be loaded.

    @ivar errors: one message per problem, each naming the file and the key.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    """Name used in the SMTP greeting, EHLO, Received: headers and the self-signed certificate."""
    data_dir: Path = Path("/var/lib/mailserver")
    """Mailboxes, directory database, TLS material, queue."""
    domain: str = ""
    """Primary mail domain: created with a postmaster account on first start when the directory
    has no domain; also where postmaster@ mail of domains without a postmaster account goes."""
    io_threads: int = 8
    """Threads doing disk work (fsync, SQLite, hashing) so the reactor thread never waits."""
    shutdown_grace: float = 30.0
    """Seconds a graceful stop waits for messages being received to finish."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path | None = None
    """PEM certificate chain. None: a self-signed certificate under data_dir/tls."""
    key: Path | None = None
    """PEM private key, with cert."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    kind: ListenerKind
    endpoint: str
    tls: TLSMode = "starttls"
    allow_plaintext_auth: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    message_size: int = 25 * 1024 * 1024
    """Largest message accepted, in octets (SMTP SIZE, 552 5.3.4 beyond)."""
    smtp_line_length: int = 4096
    """Longest SMTP command line, CRLF included."""
    recipients: int = 1000
    """Recipients per message (452 4.5.3 beyond)."""
    connections: int = 1000
    """Concurrent connections over all listeners."""
    connections_per_ip: int = 50
    """Concurrent connections from one IPv4 address or IPv6 /64."""
    smtp_idle_timeout: float = 300.0
    """Seconds an SMTP client may stay silent (RFC 5321 §4.5.3.2 asks at least 5 minutes)."""
    smtp_errors: int = 10
    """Bad commands in one SMTP session before 421 and close."""
    pop3_line_length: int = 1024
    """Longest POP3 command line, CRLF included (SASL responses are lines too)."""
    pop3_idle_timeout: float = 600.0
    """Seconds a POP3 client may stay silent (RFC 1939 §3 asks at least 10 minutes)."""
    pop3_errors: int = 10
    """Bad commands in one POP3 session before -ERR and close."""
    imap_line_length: int = 64 * 1024
    """Longest IMAP command line outside literals (literals are limited by message_size)."""
    imap_idle_timeout: float = 1800.0
    """Seconds an IMAP client may stay silent, IDLE included (RFC 3501 §5.4: at least 30 min)."""
    imap_errors: int = 20
    """Bad commands in one IMAP session before BYE and close."""
    auth_failures: int = 5
    """Failed logins one client (IPv4 address or IPv6 /64) may make in auth_window; then its
    logins are refused with a temporary error until the oldest failure leaves the window."""
    auth_window: float = 600.0
    """Seconds a failed login counts against its client."""
    auth_failure_delay: float = 2.0
    """Seconds the reply to a failed login waits (longer, up to 30 s, for an account that fails
    often from anywhere; never a refusal per account)."""


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    """Resolvers to ask, as C{"192.0.2.53"}, C{"127.0.0.1:5353"} or C{"[2001:db8::53]:53"};
    empty: those of /etc/resolv.conf."""
    timeout: float = 10.0
    """Seconds one look-up may take over all its tries; then the delivery is deferred."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Mail for C{domain} goes to C{host} instead of the domain's MX hosts (a transport map)."""

    domain: str
    host: str
    """C{"[192.0.2.7]:25"} (brackets: this host's addresses, no MX look-up) or
    C{"relay.example.net"} / C{"relay.example.net:2525"} (its MX hosts, as Postfix reads it)."""
    tls: str = "opportunistic"
    """opportunistic (STARTTLS when offered, unverified), starttls (required and verified),
    implicit (TLS from the first byte, verified), none."""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The smarthost: all remote mail (but routed domains) goes through it when C{host} is set."""

    host: str = ""
    """C{"[smtp.provider.example]:587"}; empty: no smarthost, mail goes to each domain's MX."""
    tls: str = "starttls"
    """starttls or implicit (certificate verified), opportunistic, none."""
    user: str = ""
    """User name for AUTH PLAIN at the smarthost; empty: no AUTH."""
    password_file: Path | None = None
    """File holding the smarthost password (one line), readable by the server only."""


@dataclass(frozen=True, slots=True)
class QueueConfig:
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    """Waits after the 1st, 2nd, ... failed attempt; the last one repeats until expiry."""
    expire: float = 5 * 86400.0
    """A message still undelivered this long after it was accepted bounces."""
    delay_notice: float = 4 * 3600.0
    """One "delayed" notice goes to the sender after this long undelivered (0: never)."""
    connections_per_domain: int = 10
    """Connections open at once to one destination domain."""
    connections: int = 100
    """Outbound connections open at once in all."""
    messages_per_connection: int = 100
    """Messages sent over one connection before it is closed (connection reuse)."""
    connect_timeout: float = 30.0
    """Seconds to wait for a TCP connection and the greeting of the next hop."""
    mx_port: int = 25
    """The port MX hosts (and next hops given without a port) are reached on; only tests and
    unusual networks change it."""
    command_timeout: float = 300.0
    """Seconds to wait for any one reply of the next hop (RFC 5321 §4.5.3.2 asks up to 10 min
    after the final dot; 5 minutes is Postfix's default)."""
    connection_cache_time: float = 2.0
    """Seconds a connection whose send is done stays open, idle, for the next send to the same
    domain (Postfix's smtp_connection_cache_time_limit); 0: every send opens its own."""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    routes: tuple[RouteConfig, ...] = ()
    relay: RelayConfig = field(default_factory=RelayConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    source: str = "<embedded default>"
    """Where this configuration came from (a path), for messages."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """
    Parse a size: an integer (octets) or a string such as C{"25MiB"}, C{"4 KiB"}, C{"10MB"}.

    @raise ValueError: not a size.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 25MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError("expected a size such as 25MiB, 4KiB or an integer number of octets")


def parse_duration(value: object) -> float:
    """
    Parse a duration: a number (seconds) or a string such as C{"5m"}, C{"30s"}, C{"2h"}.

    @raise ValueError: not a duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _QUANTITY.match(value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ValueError("expected a duration such as 30s, 5m, 2h or a number of seconds")


_T = TypeVar("_T")


class _Reader:
    """Collects errors while reading tables, so that a file reports all its problems at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.source}: {key}: {message}")

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.error(key, "expected a table")
            return {}
        return value

    def section(
        self,
        cls: type[_T],
        data: Mapping[str, Any],
        path: str,
        converters: Mapping[str, Callable[[Any], Any]],
        base: _T | None = None,
    ) -> _T | None:
        """
        Build dataclass C{cls} from C{data}: every key must be a field of C{cls}, and each value
        passes its converter (which raises C{ValueError} or C{TypeError} with the reason).
        """
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        ok = True
        for key, raw in data.items():
            if key not in known or key not in converters:
                self.error(f"{path}.{key}", "unknown key")
                ok = False
                continue
            try:
                values[key] = converters[key](raw)
            except (ValueError, TypeError) as e:
                self.error(f"{path}.{key}", str(e))
                ok = False
        if not ok:
            return None
        try:
            if base is not None:
                return replace(base, **values)  # type: ignore[type-var]
            return cls(**values)
        except TypeError as e:
            self.error(path, str(e))
            return None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _nonempty_string(value: Any) -> str:
    s = _string(value)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _positive_size(value: Any) -> int:
    n = parse_size(value)
    if n < 1:
        raise ValueError("must be at least 1 octet")
    return n


def _positive_duration(value: Any) -> float:
    d = parse_duration(value)
    if d <= 0:
        raise ValueError("must be longer than zero")
    return d


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError("expected one of " + ", ".join(repr(o) for o in options))
        return str(value)

    return convert


def _domain(value: Any) -> str:
    s = _string(value).strip().lower().rstrip(".")
    if s and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", s):
        raise ValueError("not a domain name")
    return s


def _port_number(value: Any) -> int:
    n = _positive_int(value)
    if n > 65535:
        raise ValueError("a port is at most 65535")
    return n


def _nameservers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError("expected a list of addresses")
    out: list[str] = []
    for item in value:
        hop = parse_next_hop(_nonempty_string(item), default_port=53)
        try:
            ipaddress.ip_address(hop.host)
        except ValueError:
            raise ValueError(f"{item!r}: a name server is an IP address (optionally :port)")
        out.append(_string(item).strip())
    return tuple(out)


def _next_hop(value: Any) -> str:
    s = _nonempty_string(value).strip()
    parse_next_hop(s)
    return s


def _next_hop_or_empty(value: Any) -> str:
    s = _string(value).strip()
    if s:
        parse_next_hop(s)
    return s


def _route_domain(value: Any) -> str:
    s = _domain(value)
    if not s:
        raise ValueError("must not be empty")
    return s


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError('expected a list of durations, such as ["1m", "5m", "1h"]')
    return tuple(_positive_duration(v) for v in value)


def parse(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """
    Parse TOML text into a L{Config}.

    @param source: the file's name, used in error messages.
    @param base_dir: relative paths in the file are taken relative to it (default: the cwd).
    @raise ConfigError: with every problem found.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"])
    root = base_dir if base_dir is not None else Path.cwd()

    def path(value: Any) -> Path:
        p = Path(_nonempty_string(value)).expanduser()
        return p if p.is_absolute() else (root / p)

    r = _Reader(source)
    for key in data:
        if key not in ("server", "tls", "listener", "limits", "dns", "route", "relay", "queue"):
            r.error(key, "unknown section")

    server = r.section(
        ServerConfig,
        r.table(data, "server"),
        "server",
        {
            "hostname": _nonempty_string,
            "data_dir": path,
            "domain": _domain,
            "io_threads": _positive_int,
            "shutdown_grace": parse_duration,
        },
    )
    tls = r.section(TLSConfig, r.table(data, "tls"), "tls", {"cert": path, "key": path})
    if tls is not None and (tls.cert is None) != (tls.key is None):
        r.error("tls", "cert and key go together: give both or neither")
    limits = r.section(
        LimitsConfig,
        r.table(data, "limits"),
        "limits",
        {
            "message_size": _positive_size,
            "smtp_line_length": _positive_size,
            "recipients": _positive_int,
            "connections": _positive_int,
            "connections_per_ip": _positive_int,
            "smtp_idle_timeout": _positive_duration,
            "smtp_errors": _positive_int,
            "pop3_line_length": _positive_size,
            "pop3_idle_timeout": _positive_duration,
            "pop3_errors": _positive_int,
            "imap_line_length": _positive_size,
            "imap_idle_timeout": _positive_duration,
            "imap_errors": _positive_int,
            "auth_failures": _positive_int,
            "auth_window": _positive_duration,
            "auth_failure_delay": parse_duration,
        },
    )
    if limits is not None and limits.smtp_line_length < 512:
        r.error("limits.smtp_line_length", "must be at least 512 (RFC 5321 §4.5.3.1.4)")
    if limits is not None and limits.pop3_line_length < 255:
        r.error("limits.pop3_line_length", "must be at least 255 (RFC 2449 §4)")
    if limits is not None and limits.imap_line_length < 1000:
        r.error("limits.imap_line_length", "must be at least 1000 (RFC 2683 §3.2.1.5 asks 8000)")

    listeners: list[ListenerConfig] = []
    raw_listeners = data.get("listener", [])
    if not isinstance(raw_listeners, list):
        r.error("listener", "expected [[listener]] tables")
        raw_listeners = []
    for i, item in enumerate(raw_listeners):
        where = f"listener[{i}]"
        if not isinstance(item, dict):
            r.error(where, "expected a table")
            continue
        missing = [k for k in ("kind", "endpoint") if k not in item]
        for k in missing:
            r.error(f"{where}.{k}", "required")
        if missing:
            continue
        listener = r.section(
            ListenerConfig,
            item,
            where,
            {
                "kind": _choice(LISTENER_KINDS),
                "endpoint": _nonempty_string,
                "tls": _choice(TLS_MODES),
                "allow_plaintext_auth": _boolean,
            },
        )
        if listener is not None:
            listeners.append(listener)
    if not raw_listeners:
        r.error("listener", "at least one [[listener]] is needed")

    dns = r.section(
        DNSConfig,
        r.table(data, "dns"),
        "dns",
        {"nameservers": _nameservers, "timeout": _positive_duration},
    )
    relay = r.section(
        RelayConfig,
        r.table(data, "relay"),
        "relay",
        {
            "host": _next_hop_or_empty,
            "tls": _choice(RELAY_TLS_MODES),
            "user": _string,
            "password_file": path,
        },
    )
    if relay is not None and relay.user and relay.password_file is None:
        r.error("relay.password_file", "required with relay.user")
    queue = r.section(
        QueueConfig,
        r.table(data, "queue"),
        "queue",
        {
            "retry": _durations,
            "expire": _positive_duration,
            "delay_notice": parse_duration,
            "connections_per_domain": _positive_int,
            "connections": _positive_int,
            "messages_per_connection": _positive_int,
            "connect_timeout": _positive_duration,
            "command_timeout": _positive_duration,
            "connection_cache_time": parse_duration,
            "mx_port": _port_number,
        },
    )
    routes: list[RouteConfig] = []
    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list):
        r.error("route", "expected [[route]] tables")
        raw_routes = []
    for i, item in enumerate(raw_routes):
        where = f"route[{i}]"
        if not isinstance(item, dict):
            r.error(where, "expected a table")
            continue
        missing = [k for k in ("domain", "host") if k not in item]
        for k in missing:
            r.error(f"{where}.{k}", "required")
        if missing:
            continue
        route = r.section(
            RouteConfig,
            item,
            where,
            {"domain": _route_domain, "host": _next_hop, "tls": _choice(RELAY_TLS_MODES)},
        )
        if route is not None:
            if any(other.domain == route.domain for other in routes):
                r.error(f"{where}.domain", f"{route.domain!r} has a route already")
            routes.append(route)

    if (
        r.errors
        or server is None
        or tls is None
        or limits is None
        or dns is None
        or relay is None
        or queue is None
    ):
        raise ConfigError(r.errors)
    return Config(
        server=server,
        tls=tls,
        listeners=tuple(listeners),
        limits=limits,
        dns=dns,
        routes=tuple(routes),
        relay=relay,
        queue=queue,
        source=source,
    )


def load(path: str | os.PathLike[str]) -> Config:
    """
    Read and parse the configuration file at C{path}; relative paths inside it are taken relative
    to the file's directory.

    @raise ConfigError: the file cannot be read or is not valid.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"])
    return parse(text, source=str(p), base_dir=p.resolve().parent)


def embedded_default(cwd: Path | None = None) -> Config:
    """
    The configuration used with no file: local domain C{localhost}, data under C{./var}, high
    ports on loopback (SMTP 2525, submission 2587 with STARTTLS and 2465 with TLS, POP3 2110
    with STLS, POP3S 2995, IMAP 2143 with STARTTLS, IMAPS 2993), a self-signed certificate made
    on first start.
    """
    root = cwd if cwd is not None else Path.cwd()
    return Config(
        server=ServerConfig(data_dir=root / "var", domain="localhost"),
        listeners=(
            ListenerConfig(kind="smtp", endpoint="tcp:2525:interface=127.0.0.1"),
            ListenerConfig(kind="submission", endpoint="tcp:2587:interface=127.0.0.1"),
            ListenerConfig(
                kind="submission", endpoint="tcp:2465:interface=127.0.0.1", tls="implicit"
            ),
            ListenerConfig(kind="pop3", endpoint="tcp:2110:interface=127.0.0.1", tls="starttls"),
            ListenerConfig(kind="pop3", endpoint="tcp:2995:interface=127.0.0.1", tls="implicit"),
            ListenerConfig(kind="imap", endpoint="tcp:2143:interface=127.0.0.1", tls="starttls"),
            ListenerConfig(kind="imap", endpoint="tcp:2993:interface=127.0.0.1", tls="implicit"),
        ),
    )


def render(config: Config) -> str:
    """The effective configuration as TOML text (what C{mailserver config check} prints)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if v is None:
            return '""'
        if isinstance(v, tuple):
            return "[" + ", ".join(value(item) for item in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    out = [f"# effective configuration from {config.source}"]
    for name in ("server", "tls", "limits", "dns", "relay", "queue"):
        section = getattr(config, name)
        out.append(f"\n[{name}]")
        for f in fields(section):
            v = getattr(section, f.name)
            if v is None:
                out.append(f"# {f.name} = (not set)")
            else:
                out.append(f"{f.name} = {value(v)}")
    for listener in config.listeners:
        out.append("\n[[listener]]")
        for f in fields(listener):
            out.append(f"{f.name} = {value(getattr(listener, f.name))}")
    for route in config.routes:
        out.append("\n[[route]]")
        for f in fields(route):
            out.append(f"{f.name} = {value(getattr(route, f.name))}")
    return "\n".join(out) + "\n"
