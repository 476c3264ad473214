#!/usr/bin/env python3
"""
IMAP IDLE hold benchmark: how many logged-in, IDLEing connections a server holds, and what each
costs it in memory.

For each level of --conns (default 10000) and each variant of --variants (plain: IMAP without
TLS; tls: implicit TLS, IMAPS), the client opens that many connections, at most --ramp (50)
being set up at once, and brings each to the idle state: (TLS handshake,) greeting,
LOGIN, SELECT INBOX, IDLE, the "+" continuation. It then holds them all --hold (10) seconds,
watching every socket: a connection that receives "* BYE" or is closed is not counted as held.
At the end it sends DONE and LOGOUT on each and waits (bounded) for the server to close.

Measured per level (server figures from /proc of the server's process trees):

  ready, held     connections that reached IDLE, and those still open after the hold
                  (target: all of them)
  PSS per conn    (tree PSS with all connections up, --settle seconds after the last one got
                  to IDLE) - (tree PSS just before the first connection), / ready, in KiB
                  (1024 octets; smaps_rollup's "kB"). Targets for our server: <= 25 KiB
                  without TLS, <= 64 KiB with TLS. RSS per conn likewise. PSS is the figure to
                  compare with a multi-process server (Dovecot: a process per session)
  after close     tree PSS once every connection is closed again (memory not given back)
  --before-idle   one command between SELECT and IDLE (a client that synchronises first):
                  "FETCH 1:* (BODY.PEEK[])" with --inbox-messages, or "APPEND Sent {100000+}"
                  (a generated message follows the LITERAL+ marker); what a session keeps
                  after its first real work (e.g. TLS buffers grown by large writes or reads)
  setup           connections set up per second over the ramp, p50/p99 of one connection's
                  setup time
  server CPU      utime+stime of the trees during the ramp, the hold and the close
  client CPU      this process's CPU during the ramp (it shares the cores with the server)

The client is one thread with non-blocking sockets on an epoll selector (no thread per
connection), so 10,000 connections cost it little. It raises its own RLIMIT_NOFILE, and
spreads its connections over several loopback source addresses (--sources 4: 127.0.0.2,
127.0.0.3, ...; IP_BIND_ADDRESS_NO_PORT) so that no source address runs out of ephemeral
ports. TLS: the client accepts any certificate (loopback, a self-signed one).

Two ways to use it:

  * our server (default): for every level and variant the script starts a fresh server (a
    temporary directory, a TOML configuration with an IMAP listener with tls = "none" and
    allow_plaintext_auth = true and one with tls = "implicit", [limits] connections and
    connections_per_ip above the level, `twistd -n mailserver --config ...` run with
    RLIMIT_NOFILE raised), adds --accounts (1) account(s) bench-idle-K@example.test (with an
    empty INBOX, or --inbox-messages messages in it), warms it up with --warmup-conns (20)
    connections, measures, and always stops it. A fresh server for each measurement: a
    Python process keeps freed memory for reuse, so a second level in the same process would
    look cheaper than it is. Logins: the accounts are made with the `mailserver` command
    (argon2id, ~0.25 s per check on these 2 cores; the server remembers a successful check
    for a while, so only the first login of each account pays it); --cheap-hash gives them a
    cheap hash instead (t=1, m=1 MiB, through the directory API), for many --accounts:

        bench/idle_hold.py                       # 10,000 plain, then 10,000 TLS
        bench/idle_hold.py --conns 1000,10000 --variants plain --hold 20

  * a running server, for example Dovecot of the Postfix + Dovecot reference stack (its
    imap process_limit is 6000, and each session is a process of about 0.5 MB):

        . "$WORKDIR/ref/ref.env"
        bench/idle_hold.py --target 127.0.0.1:$IMAP_PORT --user alice@example.test \\
            --password password --pid "$DOVECOT_PID" --name dovecot --conns 1000

    (--tls if that port is implicit TLS; the reference stack has no TLS.) Use an account with
    an empty (or small) INBOX: nothing in it is changed.

Every level prints one JSON line ("summary": true) and a table is printed at the end; --compare
FILE adds the levels of another server from an earlier --results file to the table.
Requirements: Linux (/proc), Python >= 3.11, the project installed (for our server). Only
loopback addresses are contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import resource
import selectors
import socket
import ssl
import sys
import time
from collections import Counter

from _common import (
    DOMAIN,
    PASSWORD,
    Mailbox,
    Output,
    OwnServer,
    Sampler,
    add_compare_arg,
    add_pid_name_args,
    add_server_args,
    exit_on_signals,
    fmt,
    free_port,
    load_compare,
    machine,
    make_message,
    new_parser,
    parse_pids,
    parse_target,
    quoted,
    raise_nofile,
    tree_cpu_s,
    tree_mem,
    wait_greeting,
)

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TARGET_KIB = {"plain": 25, "tls": 64}

# connection states
CONNECTING, HANDSHAKE, GREETING, LOGIN, SELECT, BEFORE, IDLE, READY, CLOSING, CLOSED = range(10)


class Conn:
    __slots__ = ("idx", "sock", "state", "buf", "out", "t0", "setup_s", "error", "events")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.sock: socket.socket | None = None
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.t0 = 0.0
        self.setup_s: float | None = None
        self.error: str | None = None
        self.events = 0


class Pool:
    """Connections driven by one selector: opened, brought to IDLE, held, closed."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        sources: list[str],
        users: list[str],
        password: str,
        mailbox: str,
        op_timeout: float,
        before_idle: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.sources = sources
        self.logins = [f"a1 LOGIN {quoted(u)} {quoted(password)}\r\n".encode() for u in users]
        self.select = f"a2 SELECT {quoted(mailbox)}\r\n".encode()
        self.before = f"a5 {before_idle}\r\n".encode() if before_idle else b""
        literal = re.search(r"\{(\d+)\+\}$", before_idle)
        if literal:  # LITERAL+: the octets follow at once, no continuation awaited
            self.before += make_message(0, int(literal.group(1)), users[0]) + b"\r\n"
        self.op_timeout = op_timeout
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.in_setup: set[Conn] = set()
        self.ready = 0
        self.dropped: Counter[str] = Counter()

    # -- driving ---------------------------------------------------------------------------

    def open(self) -> Conn:
        c = Conn(len(self.conns))
        self.conns.append(c)
        self.in_setup.add(c)
        c.t0 = time.perf_counter()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.sock = s
        try:
            s.setblocking(False)
            src = self.sources[c.idx % len(self.sources)]
            if src != "127.0.0.1":
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
            err = s.connect_ex((self.host, self.port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            self.sel.register(s, selectors.EVENT_WRITE, c)
        except OSError as e:
            self.fail(c, f"connect: {e}")
        return c

    def pump(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            c = key.data
            try:
                self.handle(c, mask)
            except (OSError, ValueError) as e:
                self.fail(c, f"{type(e).__name__}: {e}")

    def expire(self, now: float) -> None:
        """Fail the connections whose setup takes longer than op_timeout."""
        for c in [c for c in self.in_setup if now - c.t0 > self.op_timeout]:
            self.fail(c, f"setup timeout in state {c.state}")

    def handle(self, c: Conn, mask: int) -> None:
        c.events += 1
        s = c.sock
        assert s is not None
        if c.state == CONNECTING:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            if self.tls is not None:
                self.sel.unregister(s)
                c.sock = s = self.tls.wrap_socket(s, do_handshake_on_connect=False)
                self.sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                c.state = HANDSHAKE
            else:
                self.sel.modify(s, selectors.EVENT_READ, c)
                c.state = GREETING
                return
        if c.state == HANDSHAKE:
            assert isinstance(s, ssl.SSLSocket)
            try:
                s.do_handshake()
            except ssl.SSLWantReadError:
                self.sel.modify(s, selectors.EVENT_READ, c)
                return
            except ssl.SSLWantWriteError:
                self.sel.modify(s, selectors.EVENT_WRITE, c)
                return
            c.state = GREETING
            self.sel.modify(s, selectors.EVENT_READ, c)
        if mask & selectors.EVENT_WRITE and c.out:
            self.flush(c)
        if mask & selectors.EVENT_READ or (isinstance(s, ssl.SSLSocket) and s.pending()):
            self.read(c)

    def send(self, c: Conn, data: bytes) -> None:
        c.out += data
        self.flush(c)

    def flush(self, c: Conn) -> None:
        s = c.sock
        assert s is not None
        try:
            n = s.send(c.out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            n = 0
        c.out = c.out[n:]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        if self.sel.get_key(s).events != want:
            self.sel.modify(s, want, c)

    def read(self, c: Conn) -> None:
        s = c.sock
        assert s is not None
        while True:
            try:
                data = s.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self.sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                return
            if not data:
                if c.state == CLOSING:
                    self.close(c)
                else:
                    self.fail(c, "closed by the server")
                return
            c.buf += data
            while c.state != CLOSED:
                i = c.buf.find(b"\r\n")
                if i < 0:
                    break
                line, c.buf = c.buf[:i], c.buf[i + 2 :]
                self.line(c, line)
            # one recv per event (epoll is level-triggered), unless TLS holds decrypted data
            if c.state == CLOSED or not (isinstance(s, ssl.SSLSocket) and s.pending()):
                return

    def line(self, c: Conn, line: bytes) -> None:
        st = c.state
        if line.startswith(b"* BYE") and st != CLOSING:
            self.fail(c, "BYE: " + line[6:60].decode(errors="replace"))
        elif st == GREETING:
            if not line.startswith(b"* OK"):
                self.fail(c, "greeting: " + line[:60].decode(errors="replace"))
                return
            c.state = LOGIN
            self.send(c, self.logins[c.idx % len(self.logins)])
        elif st == LOGIN and line.startswith(b"a1 "):
            if not line.startswith(b"a1 OK"):
                self.fail(c, "LOGIN: " + line[3:60].decode(errors="replace"))
                return
            c.state = SELECT
            self.send(c, self.select)
        elif st == SELECT and line.startswith(b"a2 "):
            if not line.startswith(b"a2 OK"):
                self.fail(c, "SELECT: " + line[3:60].decode(errors="replace"))
                return
            if self.before:
                c.state = BEFORE
                self.send(c, self.before)
            else:
                c.state = IDLE
                self.send(c, b"a3 IDLE\r\n")
        elif st == BEFORE and line.startswith(b"a5 "):
            if not line.startswith(b"a5 OK"):
                self.fail(c, "before IDLE: " + line[3:60].decode(errors="replace"))
                return
            c.state = IDLE
            self.send(c, b"a3 IDLE\r\n")
        elif st == IDLE:
            if line.startswith(b"+"):
                c.state = READY
                c.setup_s = time.perf_counter() - c.t0
                self.in_setup.discard(c)
                self.ready += 1
            elif line.startswith(b"a3 "):
                self.fail(c, "IDLE: " + line[3:60].decode(errors="replace"))
        elif st == CLOSING and line.startswith(b"a4 "):
            self.close(c)

    def fail(self, c: Conn, why: str) -> None:
        if c.state == CLOSED:
            return
        if c.state == READY:
            self.ready -= 1
            self.dropped[why[:60]] += 1
        c.error = why[:120]
        self.close(c)

    def close(self, c: Conn) -> None:
        self.in_setup.discard(c)
        c.state = CLOSED
        s = c.sock
        if s is not None:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        c.sock = None
        c.buf = c.out = b""

    # -- phases ----------------------------------------------------------------------------

    def ramp(self, n: int, ramp: int, deadline: float) -> None:
        """Open C{n} connections, at most C{ramp} in setup at once; until all are settled."""
        opened = 0
        last_expire = time.monotonic()
        while time.monotonic() < deadline:
            while opened < n and len(self.in_setup) < ramp:
                self.open()
                opened += 1
            if opened >= n and not self.in_setup:
                return
            self.pump(0.05)
            now = time.monotonic()
            if now - last_expire > 0.5:
                self.expire(time.perf_counter())
                last_expire = now
        for c in list(self.in_setup):
            self.fail(c, "setup still running at the setup timeout")

    def hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.pump(min(left, 0.5))

    def close_all(self, timeout: float) -> int:
        """DONE + LOGOUT on every held connection, then wait for the server to close them."""
        closing = 0
        for c in self.conns:
            if c.state == READY:
                c.state = CLOSING
                closing += 1
                try:
                    self.send(c, b"DONE\r\na4 LOGOUT\r\n")
                except OSError:
                    self.close(c)
            elif c.state != CLOSED:
                self.close(c)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(c.state == CLOSING for c in self.conns):
            self.pump(0.1)
        left = 0
        for c in self.conns:
            if c.state != CLOSED:
                left += 1
                self.close(c)
        self.sel.close()
        return left

    def errors(self) -> dict[str, int]:
        counts: Counter[str] = Counter(c.error[:60] for c in self.conns if c.error)
        return dict(counts.most_common(5))


# ----------------------------------------------------------------------------- measuring


def cpu_s(roots: list[int]) -> float:
    return sum(tree_cpu_s(roots)) if roots else 0.0


def me_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback, a self-signed certificate
    return ctx


def warm_up(args, host, port, tls, users) -> int:
    """A few connections through to IDLE and closed: first-use costs out of the measure."""
    if args.warmup_conns <= 0:
        return 0
    pool = Pool(
        host, port, tls, ["127.0.0.1"], users, args.password, args.mailbox, 30, args.before_idle
    )
    pool.ramp(args.warmup_conns, args.ramp, time.monotonic() + 60)
    ready = pool.ready
    pool.close_all(10)
    return ready


def level(args, n, variant, host, port, roots, name, users, fresh) -> dict:
    tls = client_context() if variant == "tls" else None
    res: dict[str, object] = {
        "bench": "idle-hold",
        "summary": True,
        "proto": "imap",
        "server": name,
        "variant": variant,
        "conns": n,
        "fresh_server": fresh,
        "accounts": len(users),
        "sources": args.sources,
        "ramp": args.ramp,
        "hold_s": args.hold,
        "before_idle": args.before_idle or None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    res["warmup_ready"] = warm_up(args, host, port, tls, users)
    time.sleep(args.settle)
    pool = Pool(
        host,
        port,
        tls,
        args.source_list,
        users,
        args.password,
        args.mailbox,
        args.op_timeout,
        args.before_idle,
    )
    base = tree_mem(roots) if roots else None
    sampler = Sampler(roots, 0.5, args.pss_interval, args.setup_timeout + args.hold + 300)
    if roots:
        sampler.start()
    cpu0, me0 = cpu_s(roots), me_cpu_s()
    t0 = time.perf_counter()
    pool.ramp(n, args.ramp, time.monotonic() + args.setup_timeout)
    t_setup = time.perf_counter() - t0
    cpu1, me1 = cpu_s(roots), me_cpu_s()
    ready = pool.ready
    settle_end = time.monotonic() + args.settle
    while time.monotonic() < settle_end:
        pool.pump(0.1)
    at_ready = tree_mem(roots) if roots else None
    pool.hold(args.hold)
    alive = pool.ready
    at_end = tree_mem(roots) if roots else None
    cpu2 = cpu_s(roots)
    t1 = time.perf_counter()
    left = pool.close_all(args.close_timeout)
    t_close = time.perf_counter() - t1
    cpu3 = cpu_s(roots)
    time.sleep(args.settle)
    after = tree_mem(roots) if roots else None
    if roots:
        res.update(sampler.stop())
    setups = sorted(c.setup_s for c in pool.conns if c.setup_s is not None)

    def pct(q: float) -> float | None:
        if not setups:
            return None
        return round(setups[min(len(setups) - 1, int(len(setups) * q))] * 1000, 1)

    res.update(
        {
            "ready": ready,
            "alive_after_hold": alive,
            "dropped": dict(pool.dropped.most_common(5)),
            "errors": pool.errors(),
            "setup_wall_s": round(t_setup, 2),
            "setup_per_s": round(ready / t_setup, 1) if t_setup else None,
            "setup_p50_ms": pct(0.5),
            "setup_p99_ms": pct(0.99),
            "close_s": round(t_close, 2),
            "close_not_answered": left,
            "client_setup_cpu_s": round(me1 - me0, 2),
        }
    )
    if roots and base and at_ready and at_end and after:
        res.update(
            {
                "server_cpu_ramp_s": round(cpu1 - cpu0, 2),
                "server_cpu_hold_s": round(cpu2 - cpu1, 2),
                "server_cpu_close_s": round(cpu3 - cpu2, 2),
                "server_base_rss_mb": round(base["rss_kb"] / 1024, 1),
                "server_base_pss_mb": round(base["pss_kb"] / 1024, 1),
                "server_ready_rss_mb": round(at_ready["rss_kb"] / 1024, 1),
                "server_ready_pss_mb": round(at_ready["pss_kb"] / 1024, 1),
                "server_ready_nproc": at_ready["nproc"],
                "server_ready_threads": at_ready["threads"],
                "server_end_pss_mb": round(at_end["pss_kb"] / 1024, 1),
                "server_after_close_pss_mb": round(after["pss_kb"] / 1024, 1),
                "server_after_close_nproc": after["nproc"],
            }
        )
        if ready:
            per = (at_ready["pss_kb"] - base["pss_kb"]) / ready
            res["pss_kib_per_conn"] = round(per, 1)
            res["rss_kib_per_conn"] = round((at_ready["rss_kb"] - base["rss_kb"]) / ready, 1)
            if fresh:  # the targets are our server's
                res["target_pss_kib_per_conn"] = TARGET_KIB[variant]
                res["target_met"] = bool(alive == n and per <= TARGET_KIB[variant])
    return res


# ----------------------------------------------------------------------------- the benchmark


def own_server(args, n: int, inbox: int) -> tuple[OwnServer, list[str], int]:
    """A fresh server for one level: listeners, accounts, INBOXes filled; started."""
    plain, tls = free_port(), free_port()
    limit = n + args.warmup_conns + 100
    server = OwnServer(
        args,
        "idle-hold.",
        [("imap", plain, "none", True), ("imap", tls, "implicit", True)],
        DOMAIN,
        {"connections": limit, "connections_per_ip": limit},
        nofile=n + args.warmup_conns + 1000,
    )
    server.write_config()
    users = [f"bench-idle-{k}@{DOMAIN}" for k in range(args.accounts)]
    how = server.add_users(users, cheap_hash=args.cheap_hash)
    print(f"# {len(users)} account(s) added with {how}", file=sys.stderr)
    if inbox:
        for u in users:
            Mailbox(u, server.maildir(u)).fill(inbox, args.size, False)
        print(f"# INBOX of each account: {inbox} x {args.size}", file=sys.stderr)
    server.start()
    return server, users, tls


def table(rows: list[dict]) -> str:
    out = [
        "| server | variant | conns | ready / held after hold | **PSS KiB/conn** (target) | "
        "RSS KiB/conn | PSS MB base → ready → after close | procs | setup conn/s | "
        "setup p99 ms | server CPU s ramp / hold / close | client CPU s (ramp) | errors |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        target = r.get("target_pss_kib_per_conn")
        met = r.get("target_met")
        errs = {**r.get("errors", {})}
        out.append(
            f"| {r['server']} | {r['variant']} | {r['conns']} | "
            f"{r['ready']} / {r['alive_after_hold']} | "
            f"**{fmt(r.get('pss_kib_per_conn'), '{:.1f}')}** "
            f"({'≤ ' + str(target) + ', ' + ('met' if met else 'not met') if target else '—'}) | "
            f"{fmt(r.get('rss_kib_per_conn'), '{:.1f}')} | "
            f"{fmt(r.get('server_base_pss_mb'), '{:.1f}')} → "
            f"{fmt(r.get('server_ready_pss_mb'), '{:.1f}')} → "
            f"{fmt(r.get('server_after_close_pss_mb'), '{:.1f}')} | "
            f"{fmt(r.get('server_ready_nproc'))} | {fmt(r.get('setup_per_s'))} | "
            f"{fmt(r.get('setup_p99_ms'))} | "
            f"{fmt(r.get('server_cpu_ramp_s'), '{:.1f}')} / "
            f"{fmt(r.get('server_cpu_hold_s'), '{:.2f}')} / "
            f"{fmt(r.get('server_cpu_close_s'), '{:.1f}')} | "
            f"{fmt(r.get('client_setup_cpu_s'), '{:.1f}')} | "
            f"{'; '.join(f'{k} x{v}' for k, v in errs.items()) or '—'} |"
        )
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = new_parser(__doc__)
    ap.add_argument("--conns", default="10000", help="levels, comma separated (10000)")
    ap.add_argument(
        "--variants", default=None, help="plain, tls, comma separated (ours: plain,tls)"
    )
    ap.add_argument("--ramp", type=int, default=50, help="connections in setup at once (50)")
    ap.add_argument("--hold", type=float, default=10, help="seconds all are held (10)")
    ap.add_argument("--settle", type=float, default=2, help="seconds before measuring (2)")
    ap.add_argument("--setup-timeout", type=float, default=300, help="ramp at most, s (300)")
    ap.add_argument("--op-timeout", type=float, default=60, help="one setup at most, s (60)")
    ap.add_argument("--close-timeout", type=float, default=60, help="close at most, s (60)")
    ap.add_argument(
        "--sources", type=int, default=4, help="loopback source addresses 127.0.0.2... (4)"
    )
    ap.add_argument("--mailbox", default="INBOX", help="folder SELECTed (INBOX)")
    ap.add_argument(
        "--before-idle",
        default="",
        metavar="COMMAND",
        help='one command sent after SELECT and before IDLE, e.g. "FETCH 1:* (BODY.PEEK[])" '
        "(with --inbox-messages): a client that synchronises, then idles; ending in a "
        'LITERAL+ marker, e.g. "APPEND Sent {100000+}", a generated message of that many '
        "octets follows (none)",
    )
    ap.add_argument(
        "--warmup-conns",
        type=int,
        default=20,
        help="connections through to IDLE and closed before measuring (20)",
    )
    ap.add_argument(
        "--target", metavar="HOST:PORT", help="measure this running server instead of starting ours"
    )
    ap.add_argument("--tls", action="store_true", help="with --target: the port is implicit TLS")
    ap.add_argument("--user", help="with --target: the account (e.g. alice@example.test)")
    ap.add_argument("--password", help="with --target: its password")
    add_pid_name_args(ap)
    ap.add_argument("--accounts", type=int, default=1, help="ours: accounts, round robin (1)")
    ap.add_argument(
        "--inbox-messages", type=int, default=0, help="ours: messages in each INBOX (0)"
    )
    ap.add_argument("--size", type=int, default=5120, help="ours: octets per message (5120)")
    ap.add_argument(
        "--cheap-hash",
        action="store_true",
        help="ours: accounts get a cheap argon2id hash (t=1, m=1 MiB) instead of the "
        "`mailserver` command's, for many --accounts",
    )
    add_server_args(ap, port=False)
    ap.add_argument("--pss-interval", type=float, default=1.0, help="peak PSS sampling, s (1)")
    ap.add_argument("--results", help="also append every JSON line to this file")
    add_compare_arg(ap, "levels")
    args = ap.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.conns.split(",") if x.strip()]
    except ValueError:
        ap.error("--conns takes numbers")
    if not args.levels or min(args.levels) < 1 or max(args.levels) > 60000:
        ap.error("--conns: 1 to 60000")
    default = ("tls" if args.tls else "plain") if args.target else "plain,tls"
    args.variant_list = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    for v in args.variant_list:
        if v not in TARGET_KIB:
            ap.error(f"unknown variant {v}")
    if args.target and args.variant_list != [default]:
        ap.error("with --target the variant is plain, or tls with --tls")
    if args.target and not (args.user and args.password is not None):
        ap.error("--target needs --user and --password")
    if not args.target and (args.user or args.pid or args.tls):
        ap.error("--user, --pid and --tls go with --target")
    if args.ramp < 1 or args.accounts < 1 or not 1 <= args.sources <= 250:
        ap.error("--ramp and --accounts must be positive, --sources 1..250")
    if not args.target and -(-args.ramp // args.sources) > 32:
        print(
            "# more than 32 logins in flight per source address: our server refuses the "
            "excess (at most 32 password checks pending per client)",
            file=sys.stderr,
        )
    args.source_list = [f"127.0.0.{2 + i}" for i in range(args.sources)]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    exit_on_signals()
    nofile = raise_nofile(max(args.levels) + args.warmup_conns + 500)
    if nofile < max(args.levels) + 100:
        print(f"# RLIMIT_NOFILE is {nofile}: not enough for {max(args.levels)}", file=sys.stderr)
    out = Output(args.results)
    others = load_compare(args.compare, "idle-hold")
    rows: list[dict] = []
    name = args.name or (args.target if args.target else "mailserver")
    out.emit(
        {
            "bench": "idle-hold",
            "header": True,
            "server": name,
            "levels": args.levels,
            "variants": args.variant_list,
            "client": "one thread, non-blocking sockets, epoll selector",
            "client_nofile": nofile,
            "openssl": ssl.OPENSSL_VERSION,
            **machine(),
        }
    )
    ok = True
    if args.target:
        host, port = parse_target(args.target)
        roots = parse_pids(args.pid)
        if not args.tls and not wait_greeting(host, port, None, 10, "imap"):
            sys.exit(f"no IMAP server answers on {host}:{port}")
        for n in args.levels:
            res = level(args, n, args.variant_list[0], host, port, roots, name, [args.user], False)
            out.emit(res)
            rows.append(res)
            ok = ok and res["alive_after_hold"] == n
            time.sleep(args.settle)
    else:
        args.password = PASSWORD
        for n in args.levels:
            for variant in args.variant_list:
                server, users, tls_port = own_server(args, n, args.inbox_messages)
                try:
                    port = tls_port if variant == "tls" else server.port
                    res = level(
                        args, n, variant, "127.0.0.1", port, [server.pid], name, users, True
                    )
                    res["inbox_messages"] = args.inbox_messages
                    res["server_pid"] = server.pid
                    if server.proc is not None and server.proc.poll() is not None:
                        res["error"] = f"our server exited; log: {server.log}"
                finally:
                    server.stop()
                out.emit(res)
                rows.append(res)
                ok = ok and res["alive_after_hold"] == n
    print("\n" + table([o for o in others if o["server"] != name] + rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
