# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin's options and service maker: C{twistd mailserver [--config PATH]}.

Parses strings only; L{makeService} loads the configuration and hands it, with the reactor, to
L{mailserver.service.build}. This is the one module that imports the global reactor.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application.service import IService, Service
from twisted.python import usage
from typing_extensions import override

from mailserver import config as configuration
from mailserver import service

EX_CONFIG = 78  # sysexits.h: configuration error


class Options(usage.Options):
    """C{twistd mailserver} options."""

    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file (default: the embedded default: domain localhost, "
            "high ports on 127.0.0.1, data under ./var)",
        ],
    ]


class _SignalHandlers(Service):
    """
    SIGHUP reloads the TLS certificates. SIGTERM stops the reactor as a normal stop (graceful,
    exit status 0, what systemd expects of C{systemctl stop}) rather than as twistd's default,
    which re-raises the signal at exit. Installed once the reactor runs, over its handlers.
    """

    def __init__(self, root: service.MailService, reactor: Any) -> None:
        self._root = root
        self._reactor = reactor

    @override
    def startService(self) -> None:
        super().startService()
        # After the reactor's own handlers, which it installs as it starts running.
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        signal.signal(
            signal.SIGHUP,
            lambda signum, frame: self._reactor.callFromThread(self._root.reload_tls),
        )
        signal.signal(
            signal.SIGTERM,
            lambda signum, frame: self._reactor.callFromThread(self._reactor.stop),
        )


def makeService(options: Options) -> IService:
    """Build the server from the configuration named in C{options} (or the embedded default)."""
    from twisted.internet import reactor

    path = options["config"]
    try:
        cfg = configuration.load(path) if path else configuration.embedded_default()
    except configuration.ConfigError as e:
        for line in e.errors:
            print(f"mailserver: {line}", file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    root = service.build(cfg, reactor)
    _SignalHandlers(root, reactor).setServiceParent(root)
    return root
