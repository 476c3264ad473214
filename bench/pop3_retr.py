#!/usr/bin/env python3
"""
POP3 download benchmark: how fast one session takes a whole mailbox out of a server.

Modes (--modes, comma separated; default sequential,pipelined):

  sequential  one session: USER/PASS, STAT, LIST, then RETR 1..N one command at a time (send
              "RETR n", read the whole answer, next: what poplib and most clients do), QUIT
  pipelined   the same with --window (50) RETR commands outstanding (RFC 2449 PIPELINING: the
              client sends the next commands while answers are still arriving)
  big         RETR of one --big-size (20 MiB) message: the growth of the server's RSS from
              just before the RETR to its peak during it (target < 5 MB). The client reads at
              --big-read-rate (10 MB/s; 0 = as fast as it can) with a 256 KiB receive buffer,
              so a server that does not stop reading the file while the client is slow has to
              hold the message in memory
  stat100k    USER, PASS, STAT, QUIT on a --stat-messages (100,000) message mailbox with a warm
              index (the first, cold, login is a warm-up run): PASS+STAT time, the time a client
              waits for the mailbox to be listed (target < 0.5 s; a POP3 server opens the
              mailbox at PASS, or at the first command that needs it: Dovecot at STAT),
              and PASS and STAT apart (PASS includes the password check: argon2id for our
              server, about 0.1 s; {PLAIN} in the reference stack's passwd-file)

The mailbox of each mode is filled by writing maildir files directly (tmp/, then rename into
new/): sequential and pipelined share --messages (2000) messages of --size (5120) octets,
CRLF line endings, realistic headers (Return-Path, Received, Date, From, To, Subject,
Message-ID, MIME), some bodies with lines that need dot-stuffing. When run as root the files
get the owner of the maildir. Then --warmup (1) runs make the server look at the mailbox
(the cold figure: reported, not in the median) before --runs (3) measured runs.

Measured per run (RETR phase: from the first RETR sent to the last answer read):

  msg/s, MB/s     messages and octets received (after un-dot-stuffing; MB = 10^6 octets)
                  per second of RETR phase
  checks          the count against STAT and the number of messages written, every message's
                  octets against what LIST announced, the total against STAT's octets;
                  --verify also compares every message's content with what was written
                  (costs client CPU)
  server CPU      utime+stime (children included) of the server's process trees from
                  /proc/PID/stat, over the RETR phase (server_cpu_s, and per 1000 messages)
                  and over the whole session (server_session_cpu_s)
  server memory   peak RSS of the process trees (sampled every --sample-interval, 20 ms) and
                  peak PSS (every --pss-interval, 0.5 s) over the session; for multi-process
                  servers (Dovecot: one process per session) compare PSS
  client CPU      the client thread's CPU time (user+system, and system alone) over the RETR
                  phase (it shares the cores with the server)

The client is a raw socket client (TCP_NODELAY, 256 KiB reads, each multi-line answer framed
by finding CRLF.CRLF in the buffer): with poplib (one readline per line) the client uses as
much CPU as a fast server, and the figure would be the client's.

Two ways to use it:

  * our server (default): the script makes a temporary directory with a TOML configuration
    (one POP3 listener on 127.0.0.1, tls = "none", allow_plaintext_auth = true), adds one
    account per mailbox (bench-retr, bench-big, bench-stat @example.test) with the
    `mailserver` command, fills their maildirs under <data_dir>/mail/, starts
    `twistd -n mailserver --config ...`, waits for the greeting, runs the benchmark and
    always stops the server (SIGTERM, then SIGKILL after a bounded wait):

        bench/pop3_retr.py
        bench/pop3_retr.py --modes sequential,pipelined,big,stat100k --runs 3

  * a running server, for example Dovecot of the Postfix + Dovecot reference stack:

        . "$WORKDIR/ref/ref.env"
        bench/pop3_retr.py --target 127.0.0.1:$POP3_PORT --user bob@example.test \\
            --password password --maildir "$MAILDIR_FMT" --pid "$DOVECOT_PID" --name dovecot

    --maildir may contain %u (local part), %d (domain), %a (address); --pid takes one or
    more root PIDs (space or comma separated, repeatable) whose whole trees are measured.
    The maildir is emptied (new/ cur/ tmp/ and Dovecot's index files) and refilled before a
    mode that needs other contents, and emptied at the end (--keep-mailbox keeps it): only
    point it at an idle test mailbox. --no-fill uses the mailbox as it is (no content
    checks against what was written; the modes then all use it).

Every run prints one JSON line, every mode a summary line with medians, and tables are
printed at the end. Requirements: Linux (/proc), Python >= 3.11, the project installed (for
our server). Only 127.0.0.1 is ever contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from email.utils import formatdate
from pathlib import Path

from smtp_accept import (
    Output,
    Sampler,
    _rss_kb,
    command,
    filesystem_of,
    free_port,
    host_busy_since,
    host_cpu_snapshot,
    maildir_clear,
    main_threads_cpu_s,
    median,
    tree_cpu_s,
    tree_pids,
)

PASSWORD = "bench-password-1"
DOMAIN = "example.test"
TWISTD_MAIN = "from twisted.scripts.twistd import run\nrun()\n"
MODES = ("sequential", "pipelined", "big", "stat100k")
RECV = 256 * 1024
MIB = 1024 * 1024

# ----------------------------------------------------------------------------- messages

_WORDS = (
    "mail server queue relay maildir fsync imap pop3 smtp twisted deferred reactor message "
    "header body envelope recipient sender meeting report budget the of and to in for on with "
    "please find attached below thanks regards tomorrow schedule project update review draft"
).split()


def _line_pool(n: int = 509) -> list[bytes]:
    rnd = random.Random(1939)
    pool = []
    for _ in range(n):
        words: list[str] = []
        width = rnd.randint(40, 72)
        while len(" ".join(words)) < width:
            words.append(rnd.choice(_WORDS))
        line = " ".join(words)[:76]
        pool.append(line.rstrip().encode() + b"\r\n")
    return pool


_POOL = _line_pool()


def make_message(i: int, size: int, rcpt: str) -> bytes:
    """
    Message C{i} of a mailbox: realistic headers, a body of text lines, CRLF line endings,
    exactly C{size} octets (or the headers plus an empty line when C{size} is smaller). Some
    messages have a line "." or a line starting with "..", which a server must dot-stuff.
    """
    ts = 1_700_000_000 + i * 37
    date = formatdate(ts, usegmt=True)
    n = i % 50
    sender = f"user{n}@sender{i % 7}.perf.test"
    subject = b" ".join(_POOL[(i * 13) % len(_POOL)].split()[:5]).decode()
    head = (
        f"Return-Path: <{sender}>\r\n"
        f"Delivered-To: {rcpt}\r\n"
        f"Received: from client{n}.perf.test (client{n}.perf.test [192.0.2.{n + 1}])\r\n"
        f"\tby mx.{DOMAIN} with ESMTP id {i:08X}B{size:X}\r\n"
        f"\tfor <{rcpt}>; {date}\r\n"
        f"Date: {date}\r\n"
        f'From: "Sender {n}" <{sender}>\r\n'
        f"To: <{rcpt}>\r\n"
        f"Subject: [perf {i}] {subject}\r\n"
        f"Message-ID: <{i}.{ts}.pop3retr@sender{i % 7}.perf.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    out = bytearray(head)
    k = (i * 7919) % len(_POOL)
    lines = 0
    limit = size // 10 + 100  # bounded: lines are >= 40 octets
    while size - len(out) > 80 and lines < limit:
        if lines == 5 and i % 7 == 3:
            out += b".\r\n"  # a line that is a lone dot
        elif lines == 9 and i % 7 == 5:
            out += b"..starts with two dots\r\n"
        else:
            out += _POOL[k]
            k = (k + 1) % len(_POOL)
        lines += 1
    rest = size - len(out)
    if rest >= 2:
        filler = (_POOL[k] + _POOL[(k + 1) % len(_POOL)]).replace(b"\r\n", b" ")
        out += filler[: rest - 2] + b"\r\n"
    elif len(out) == len(head):
        out += b"\r\n"
    return bytes(out)


class Mailbox:
    """One account's maildir, filled by this script (or used as it is with --no-fill)."""

    def __init__(self, account: str, path: Path) -> None:
        self.account = account
        self.path = path
        self.contents: tuple[int, int] | None = None  # (count, size) written
        self.digests: Counter[bytes] = Counter()

    def fill(self, count: int, size: int, verify: bool) -> float:
        """Empty the maildir and write C{count} messages of C{size} octets; seconds taken."""
        t0 = time.monotonic()
        for sub in ("new", "cur", "tmp"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        maildir_clear(self.path)
        owner = None
        st = os.stat(self.path)
        if os.geteuid() == 0 and st.st_uid != 0:
            owner = (st.st_uid, st.st_gid)
            for sub in ("new", "cur", "tmp"):
                os.chown(self.path / sub, *owner)
        self.digests = Counter()
        self.contents = None
        pid = os.getpid()
        base = int(time.time()) - count
        tmp, new = self.path / "tmp", self.path / "new"
        for i in range(count):
            msg = make_message(i, size, self.account)
            if verify:
                self.digests[hashlib.sha1(msg).digest()] += 1
            name = f"{base + i}.M{i % 1_000_000}P{pid}Q{i + 1}.pop3retr,S={len(msg)},W={len(msg)}"
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(msg)
                while view:
                    view = view[os.write(fd, view) :]
                if owner:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
            os.rename(tmp / name, new / name)
        self.contents = (count, size)
        return time.monotonic() - t0

    def clear(self) -> None:
        if self.path.is_dir():
            maildir_clear(self.path)
        self.contents = None


# ----------------------------------------------------------------------------- client


class POP3Error(Exception):
    """The server answered -ERR, or something that is not POP3."""


class Client:
    """
    A raw POP3 client on a blocking socket. Answers are read from one buffer; a multi-line
    answer is framed by finding CRLF.CRLF from its status line's CRLF. Commands queued with
    L{queue} are sent before the client would block in recv (and in batches of C{batch}).
    """

    def __init__(
        self,
        host: str,
        port: int,
        io_timeout: float,
        deadline: float,
        rcvbuf: int = 0,
        read_rate: float = 0,
    ) -> None:
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(io_timeout)
        try:
            self.sock.connect((host, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.pos = 0
        self.pending: list[bytes] = []
        self.batch = 1
        self.read_rate = read_rate  # octets/s, 0: unlimited
        self.bytes_in = 0
        self.t_read0 = 0.0
        self.recvs = 0

    def close(self) -> None:
        self.sock.close()

    def queue(self, cmd: bytes) -> None:
        self.pending.append(cmd)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.sock.sendall(b"".join(self.pending))
            self.pending.clear()

    def _fill(self) -> None:
        self.flush()
        now = time.monotonic()
        if now > self.deadline:
            raise TimeoutError("run deadline")
        if self.read_rate:
            if not self.t_read0:
                self.t_read0 = now
            ahead = self.t_read0 + self.bytes_in / self.read_rate - now
            if ahead > 0:
                time.sleep(min(ahead, max(0.0, self.deadline - now)))
        data = self.sock.recv(RECV)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.recvs += 1
        self.bytes_in += len(data)
        self.buf += data

    def _compact(self) -> None:
        if self.pos > 65536:
            del self.buf[: self.pos]
            self.pos = 0

    def line(self) -> bytes:
        """One line (a status line), without its CRLF."""
        self._compact()
        start = self.pos
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[self.pos : i])
                self.pos = i + 2
                return line
            if len(self.buf) - self.pos > 65536:
                raise POP3Error("status line longer than 64 KiB")
            start = max(self.pos, len(self.buf) - 1)
            self._fill()

    def ok(self, what: str) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{what}: {line[:200].decode(errors='replace')}")
        return line

    def command(self, cmd: str) -> bytes:
        """Send a command with a one-line answer; the +OK line."""
        self.sock.sendall(cmd.encode() + b"\r\n")
        return self.ok(cmd.split()[0])

    def multiline(self) -> tuple[bytes, int, int, int]:
        """
        One answer that is multi-line when it is +OK: (status line, octets after
        un-dot-stuffing, start, end of the stuffed data in C{self.buf}, valid until the next
        call). A -ERR answer is one line: (status line, -1, 0, 0).
        """
        self._compact()
        start = self.pos
        search = start
        while True:
            i = self.buf.find(b"\r\n", search)
            if i >= 0:
                break
            if len(self.buf) - start > 65536:
                raise POP3Error("status line longer than 64 KiB")
            search = max(start, len(self.buf) - 1)
            self._fill()
        status = bytes(self.buf[start:i])
        if not status.startswith(b"+OK"):
            self.pos = i + 2
            return status, -1, 0, 0
        search = i
        while True:
            j = self.buf.find(b"\r\n.\r\n", search)
            if j >= 0:
                break
            search = max(i, len(self.buf) - 4)
            self._fill()
        stuffed = self.buf.count(b"\r\n..", i, j + 3)
        self.pos = j + 5
        return status, (j - i) - stuffed, i + 2, j + 2

    def unstuffed(self, start: int, end: int) -> bytes:
        return (b"\r\n" + bytes(self.buf[start:end])).replace(b"\r\n..", b"\r\n.")[2:]


def login(c: Client, user: str, password: str) -> tuple[float, float]:
    """Greeting, USER, PASS; (greeting+USER seconds, PASS seconds)."""
    t0 = time.perf_counter()
    c.ok("greeting")
    c.command(f"USER {user}")
    t1 = time.perf_counter()
    c.command(f"PASS {password}")
    return t1 - t0, time.perf_counter() - t1


def stat(c: Client) -> tuple[int, int]:
    words = c.command("STAT").split()
    try:
        return int(words[1]), int(words[2])
    except (IndexError, ValueError):
        raise POP3Error(f"STAT: {b' '.join(words)[:200]!r}")


def list_sizes(c: Client, count: int) -> list[int]:
    """LIST: sizes[n - 1] is what LIST announces for message n (-1: not listed)."""
    c.sock.sendall(b"LIST\r\n")
    status, _, start, end = c.multiline()
    if not status.startswith(b"+OK"):
        raise POP3Error(f"LIST: {status[:200]!r}")
    sizes = [-1] * count
    for line in bytes(c.buf[start:end]).split(b"\r\n")[: count + 1]:
        words = line.split()
        if len(words) >= 2 and words[0].isdigit() and words[1].isdigit():
            n = int(words[0])
            if 1 <= n <= count:
                sizes[n - 1] = int(words[1])
    return sizes


def retr_all(
    c: Client, count: int, window: int, sizes: list[int], digests: Counter[bytes] | None
) -> dict[str, object]:
    """RETR 1..count with C{window} commands outstanding; what was received and checked."""
    octets = 0
    ok = errs = wrong_size = 0
    problems: list[str] = []
    seen: Counter[bytes] = Counter()
    c.batch = max(1, window // 4)
    sent = 0
    while sent < min(window, count):
        sent += 1
        c.pending.append(b"RETR %d\r\n" % sent)
    c.flush()
    for n in range(1, count + 1):
        status, got, start, end = c.multiline()
        if sent < count:
            sent += 1
            c.queue(b"RETR %d\r\n" % sent)
        if got < 0:
            if not status.startswith(b"-ERR"):
                raise POP3Error(
                    f"RETR {n}: answer is neither +OK nor -ERR (framing lost): "
                    f"{status[:80].decode(errors='replace')!r}"
                    + (f"; before: {'; '.join(problems)}" if problems else "")
                )
            errs += 1
            if len(problems) < 5:
                problems.append(f"RETR {n}: {status[:120].decode(errors='replace')}")
            continue
        ok += 1
        octets += got
        if got != sizes[n - 1]:
            wrong_size += 1
            if len(problems) < 5:
                problems.append(f"RETR {n}: {got} octets, LIST said {sizes[n - 1]}")
        if digests is not None:
            seen[hashlib.sha1(c.unstuffed(start, end)).digest()] += 1
    c.flush()
    out: dict[str, object] = {
        "retrieved": ok,
        "octets": octets,
        "retr_errors": errs,
        "size_mismatches": wrong_size,
    }
    if digests is not None:
        out["content_mismatches"] = sum((seen - digests).values()) + sum((digests - seen).values())
        if out["content_mismatches"] and len(problems) < 5:
            problems.append(f"{out['content_mismatches']} messages differ from what was written")
    if problems:
        out["problems"] = problems
    return out


# ----------------------------------------------------------------------------- one run


class Meter:
    """Server CPU (process trees), host CPU, client thread CPU, peak RSS/PSS of one window."""

    def __init__(self, roots: list[int], args: argparse.Namespace, interval: float) -> None:
        self.roots = roots
        self.sampler = Sampler(roots, interval, args.pss_interval, args.run_timeout + 30)

    def start(self) -> Meter:
        self.sampler.start()
        self.host0 = host_cpu_snapshot()
        return self

    def stop(self) -> dict[str, object]:
        out: dict[str, object] = dict(host_busy_since(self.host0))
        out.update(self.sampler.stop())
        return out


def cpu_mark(roots: list[int]) -> tuple[float, ...]:
    """
    CPU seconds now: server user, server system, server main threads (of the trees), client
    thread user, client thread system.
    """
    user, system = tree_cpu_s(roots)
    me = resource.getrusage(resource.RUSAGE_THREAD)
    return user, system, main_threads_cpu_s(roots), me.ru_utime, me.ru_stime


def cpu_delta(a: tuple, b: tuple, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_cpu_s": round((b[0] - a[0]) + (b[1] - a[1]), 3),
        f"{prefix}_cpu_user_s": round(b[0] - a[0], 3),
        f"{prefix}_cpu_sys_s": round(b[1] - a[1], 3),
        f"{prefix}_main_thread_cpu_s": round(b[2] - a[2], 3),
    }


def client_cpu(a: tuple, b: tuple) -> dict[str, float]:
    return {
        "client_cpu_s": round((b[3] - a[3]) + (b[4] - a[4]), 3),
        "client_cpu_sys_s": round(b[4] - a[4], 3),
    }


def tree_rss_kb(roots: list[int]) -> int:
    return sum(_rss_kb(p) for p in tree_pids(roots))


def run_retr(args, host, port, mbx, roots, mode, run, warmup, name) -> dict:
    """One session of mode sequential, pipelined or big."""
    big = mode == "big"
    window = args.window if mode == "pipelined" else 1
    res: dict[str, object] = {
        "bench": "pop3-retr",
        "server": name,
        "mode": mode,
        "window": window,
        "run": run,
        "warmup": warmup,
    }
    expect = mbx.contents[0] if mbx.contents else None
    deadline = time.monotonic() + args.run_timeout
    interval = min(args.sample_interval, 0.005) if big else args.sample_interval
    meter = Meter(roots, args, interval)
    if not big:
        meter.start()
    session0 = cpu_mark(roots)
    c = None
    try:
        rate = args.big_read_rate * 1e6 if big else 0
        c = Client(host, port, args.io_timeout, deadline, RECV if rate else 0, rate)
        t0 = time.perf_counter()
        _, pass_s = login(c, args.user_for(mbx), args.password)
        count, total = stat(c)
        t_stat = time.perf_counter()
        res.update({"messages": count, "mailbox_octets": total, "login_s": round(pass_s, 4)})
        if count > args.max_messages:
            raise POP3Error(f"STAT says {count} messages, more than --max-messages")
        sizes = list_sizes(c, count)
        res["list_s"] = round(time.perf_counter() - t_stat, 4)
        if big:
            time.sleep(0.05)
            res["server_rss_before_retr_mb"] = round(tree_rss_kb(roots) / 1024, 1)
            meter.start()
        a = cpu_mark(roots)
        t1 = time.perf_counter()
        digests = mbx.digests if args.verify and mbx.contents else None
        got = retr_all(c, count, window, sizes, digests)
        t2 = time.perf_counter()
        b = cpu_mark(roots)
        if big:
            res.update(meter.stop())
            meter = None
        c.command("QUIT")
        t3 = time.perf_counter()
        dt = t2 - t1
        res.update(got)
        res.update(
            {
                "retr_s": round(dt, 4),
                "total_s": round(t3 - t0, 4),
                "msg_per_s": round(count / dt, 1) if count and dt > 0 else None,
                "mb_per_s": round(got["octets"] / 1e6 / dt, 2) if dt > 0 else None,
                "client_recvs": c.recvs,
            }
        )
        res.update(cpu_delta(a, b, "server"))
        res.update(client_cpu(a, b))
        res["server_cpu_s_per_1000_msgs"] = (
            round(res["server_cpu_s"] * 1000 / count, 3) if count else None
        )
        problems = list(got.pop("problems", []))
        if expect is not None and count != expect:
            problems.insert(0, f"STAT says {count} messages, {expect} were written")
        if got["retrieved"] != count:
            problems.append(f"retrieved {got['retrieved']}/{count}")
        if got["octets"] != total:
            problems.append(f"received {got['octets']} octets, STAT said {total}")
        if problems:
            res["error"] = "; ".join(problems)
    except (OSError, POP3Error, TimeoutError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if c is not None:
            c.close()
    time.sleep(0.05)  # let a per-session server process exit and be reaped
    res.update(cpu_delta(session0, cpu_mark(roots), "server_session"))
    if meter is not None and meter.sampler.is_alive():
        res.update(meter.stop())
    if big:
        res["big_read_rate_mb_per_s"] = args.big_read_rate or None
        if roots and "server_peak_rss_mb" in res and "server_rss_before_retr_mb" in res:
            growth = res["server_peak_rss_mb"] - res["server_rss_before_retr_mb"]
            res["server_rss_growth_mb"] = round(growth, 1)
            res["target_rss_growth_lt_5mb"] = growth < 5
    return no_server_figures(res, roots)


def no_server_figures(res: dict, roots: list[int]) -> dict:
    """Without --pid there is nothing to measure: the server figures are null, not 0."""
    if not roots:
        for k in res:
            if k.startswith("server_"):
                res[k] = None
    return res


def run_stat(args, host, port, mbx, roots, run, warmup, name) -> dict:
    """One session of mode stat100k: USER, PASS, STAT, QUIT."""
    res: dict[str, object] = {
        "bench": "pop3-retr",
        "server": name,
        "mode": "stat100k",
        "run": run,
        "warmup": warmup,
    }
    expect = mbx.contents[0] if mbx.contents else None
    meter = Meter(roots, args, args.sample_interval).start()
    a = cpu_mark(roots)
    c = None
    try:
        c = Client(host, port, args.io_timeout, time.monotonic() + args.run_timeout)
        _, pass_s = login(c, args.user_for(mbx), args.password)
        t1 = time.perf_counter()
        count, total = stat(c)
        stat_s = time.perf_counter() - t1
        c.command("QUIT")
        res.update(
            {
                "messages": count,
                "mailbox_octets": total,
                "pass_s": round(pass_s, 4),
                "stat_s": round(stat_s, 4),
                "pass_stat_s": round(pass_s + stat_s, 4),
                "target_pass_stat_lt_0_5s": (pass_s + stat_s) < 0.5,
            }
        )
        if expect is not None and count != expect:
            res["error"] = f"STAT says {count} messages, {expect} were written"
    except (OSError, POP3Error, TimeoutError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if c is not None:
            c.close()
    time.sleep(0.05)
    b = cpu_mark(roots)
    res.update(cpu_delta(a, b, "server"))
    res.update(client_cpu(a, b))
    res.update(meter.stop())
    return no_server_figures(res, roots)


# ----------------------------------------------------------------------------- our server


def wait_pop3(host: str, port: int, proc: subprocess.Popen | None, seconds: float) -> bool:
    """Wait (bounded) until the port answers with a POP3 greeting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if greeting.startswith(b"+OK"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class OwnServer:
    """Our server in a temporary directory, started as a child process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="pop3-retr.", dir=args.work_dir))
        self.data = self.dir / "data"
        self.cfg = self.dir / "mailserver.toml"
        self.log = self.dir / "server.log"
        self.port = args.port or free_port()
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.cfg.write_text(
            f"""# written by bench/pop3_retr.py
[server]
hostname = "mx.{DOMAIN}"
data_dir = "{self.data}"
domain = "{DOMAIN}"
io_threads = {self.args.io_threads}
shutdown_grace = "5s"

[limits]
connections = 1000
connections_per_ip = 1000

[[listener]]
kind = "pop3"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "none"
allow_plaintext_auth = true
""",
            encoding="utf-8",
        )

    def add_users(self, accounts: list[str]) -> str:
        """Create the domain and the accounts with the `mailserver` command (or its API)."""
        cli = command("mailserver", "mailserver.cli")
        cfg = ["--config", str(self.cfg)]
        steps = [(cli + ["domain", "add", DOMAIN] + cfg, None)]
        for a in accounts:
            steps.append((cli + ["user", "add", a, "--password-stdin"] + cfg, PASSWORD + "\n"))
        try:
            for cmd, stdin in steps:
                r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"{shlex.join(cmd)}: {r.stderr.strip()}")
            return "mailserver CLI"
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"# mailserver CLI failed ({e}); using the Python API", file=sys.stderr)
        from mailserver.directory import open_directory  # the project, installed

        directory = open_directory(self.data, DOMAIN)
        try:
            if not directory.is_local_domain(DOMAIN):
                directory.add_domain(DOMAIN)
            for a in accounts:
                if not directory.user_exists(a):
                    directory.add_user(a, PASSWORD)
        finally:
            directory.close()
        return "mailserver.directory API"

    def maildir(self, account: str) -> Path:
        local, _, domain = account.rpartition("@")
        return self.data / "mail" / domain / local

    def command(self) -> list[str]:
        twistd_args = [
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "mailserver",
            "--config",
            str(self.cfg),
        ]
        if self.args.twistd:
            return shlex.split(self.args.twistd) + twistd_args
        twistd = shutil.which("twistd")
        return ([twistd] if twistd else [sys.executable, "-c", TWISTD_MAIN]) + twistd_args

    def start(self) -> None:
        cmd = self.command()
        print(f"# our server: {shlex.join(cmd)}", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "server.out", "wb"),
            stderr=subprocess.STDOUT,
        )
        if not wait_pop3("127.0.0.1", self.port, self.proc, self.args.start_timeout):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            out = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server did not answer on port {self.port}\n{tail}\n{out}")

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(self.args.stop_timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"# server {p.pid} still running after {self.args.stop_timeout}s: SIGKILL",
                    file=sys.stderr,
                )
                p.kill()
                p.wait(10)
        if self.args.keep_dir:
            print(f"# kept the server directory {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the benchmark


def contents_for(args: argparse.Namespace, mode: str) -> tuple[str, int, int]:
    """(mailbox kind, messages, octets each) that C{mode} needs."""
    if mode == "big":
        return "big", 1, args.big_size
    if mode == "stat100k":
        return "stat", args.stat_messages, args.stat_size
    return "retr", args.messages, args.size


def summarize(mode: str, name: str, results: list[dict]) -> dict:
    measured = [r for r in results if not r["warmup"]]
    ok = [r for r in measured if "error" not in r]

    def med(key: str) -> float | None:
        return median([r.get(key) for r in measured])

    def top(key: str) -> float | None:
        return max([r[key] for r in measured if r.get(key) is not None], default=None)

    s: dict[str, object] = {
        "bench": "pop3-retr",
        "summary": True,
        "server": name,
        "mode": mode,
        "messages": median([r.get("messages") for r in results]),
        "runs": len(measured),
        "ok_runs": len(ok),
        "cold": [
            r.get("pass_stat_s" if mode == "stat100k" else "msg_per_s")
            for r in results
            if r["warmup"]
        ],
        "median_server_cpu_s": med("server_cpu_s"),
        "median_client_cpu_s": med("client_cpu_s"),
        "max_server_peak_rss_mb": top("server_peak_rss_mb"),
        "max_server_peak_pss_mb": top("server_peak_pss_mb"),
        "median_host_cpu_busy": med("host_cpu_busy"),
    }
    if mode == "stat100k":
        s["median_pass_stat_s"] = med("pass_stat_s")
        s["median_stat_s"] = med("stat_s")
        s["all_pass_stat_s"] = [r.get("pass_stat_s") for r in measured]
        s["target_pass_stat_lt_0_5s"] = (
            s["median_pass_stat_s"] < 0.5 if s["median_pass_stat_s"] is not None else None
        )
    else:
        s["window"] = results[0]["window"] if results else None
        s["median_msg_per_s"] = med("msg_per_s")
        s["median_mb_per_s"] = med("mb_per_s")
        s["all_msg_per_s"] = [r.get("msg_per_s") for r in measured]
        s["median_server_cpu_s_per_1000_msgs"] = med("server_cpu_s_per_1000_msgs")
        s["median_server_session_cpu_s"] = med("server_session_cpu_s")
    if mode == "big":
        s["median_server_rss_before_retr_mb"] = med("server_rss_before_retr_mb")
        s["max_server_rss_growth_mb"] = top("server_rss_growth_mb")
        s["big_read_rate_mb_per_s"] = results[0].get("big_read_rate_mb_per_s") if results else None
        g = s["max_server_rss_growth_mb"]
        s["target_rss_growth_lt_5mb"] = g < 5 if g is not None else None
    return s


def _f(v, fmt="{:.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def tables(summaries: list[dict]) -> str:
    out = []
    retr = [s for s in summaries if s["mode"] in ("sequential", "pipelined")]
    if retr:
        out += [
            "| server | mode | msgs | **msg/s** | MB/s | msg/s, each run | cold msg/s | "
            "server CPU s (per 1000 msgs) | client CPU s | peak RSS MB | peak PSS MB | ok runs |",
            "|" + "---|" * 12,
        ]
        for s in retr:
            mode = "sequential" if s["mode"] == "sequential" else f"pipelined ({s['window']})"
            out.append(
                f"| {s['server']} | {mode} | {_f(s['messages'])} | "
                f"**{_f(s['median_msg_per_s'])}** | {_f(s['median_mb_per_s'], '{:.1f}')} | "
                f"{', '.join(_f(x) for x in s['all_msg_per_s'])} | "
                f"{', '.join(_f(x) for x in s['cold']) or '—'} | "
                f"{_f(s['median_server_cpu_s'], '{:.2f}')} "
                f"({_f(s['median_server_cpu_s_per_1000_msgs'], '{:.3f}')}) | "
                f"{_f(s['median_client_cpu_s'], '{:.2f}')} | "
                f"{_f(s['max_server_peak_rss_mb'], '{:.1f}')} | "
                f"{_f(s['max_server_peak_pss_mb'], '{:.1f}')} | {s['ok_runs']}/{s['runs']} |"
            )
    for s in summaries:
        if s["mode"] == "big":
            rate = s["big_read_rate_mb_per_s"]
            out += [
                "",
                "| server | RETR of one message | client reads at | RSS before MB | "
                "peak RSS MB | **RSS growth MB** (target < 5) | MB/s | server CPU s | ok runs |",
                "|" + "---|" * 9,
                f"| {s['server']} | {s.get('size_mib', '?')} MiB | "
                f"{_f(rate, '{:g} MB/s') if rate else 'full speed'} | "
                f"{_f(s['median_server_rss_before_retr_mb'], '{:.1f}')} | "
                f"{_f(s['max_server_peak_rss_mb'], '{:.1f}')} | "
                f"**{_f(s['max_server_rss_growth_mb'], '{:.1f}')}** | "
                f"{_f(s['median_mb_per_s'], '{:.1f}')} | "
                f"{_f(s['median_server_cpu_s'], '{:.2f}')} | {s['ok_runs']}/{s['runs']} |",
            ]
        if s["mode"] == "stat100k":
            out += [
                "",
                "| server | messages | cold PASS+STAT s | **PASS+STAT s** (target < 0.5) | "
                "each run | STAT alone s | server CPU s | peak RSS MB | peak PSS MB | ok runs |",
                "|" + "---|" * 10,
                f"| {s['server']} | {_f(s['messages'])} | "
                f"{', '.join(_f(x, '{:.3f}') for x in s['cold']) or '—'} | "
                f"**{_f(s['median_pass_stat_s'], '{:.3f}')}** | "
                f"{', '.join(_f(x, '{:.3f}') for x in s['all_pass_stat_s'])} | "
                f"{_f(s['median_stat_s'], '{:.4f}')} | "
                f"{_f(s['median_server_cpu_s'], '{:.2f}')} | "
                f"{_f(s['max_server_peak_rss_mb'], '{:.1f}')} | "
                f"{_f(s['max_server_peak_pss_mb'], '{:.1f}')} | {s['ok_runs']}/{s['runs']} |",
            ]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--modes",
        default="sequential,pipelined",
        help="comma separated, run in the order given: "
        + ", ".join(MODES)
        + " (sequential,pipelined)",
    )
    ap.add_argument("-n", "--messages", type=int, default=2000, help="mailbox size (2000)")
    ap.add_argument("--size", type=int, default=5120, help="octets per message (5120)")
    ap.add_argument("--window", type=int, default=50, help="pipelined: RETRs outstanding (50)")
    ap.add_argument("--big-size", type=int, default=20 * MIB, help="big: octets (20 MiB)")
    ap.add_argument(
        "--big-read-rate",
        type=float,
        default=10,
        help="big: client reads at most this many MB/s, 0 = as fast as it can (10)",
    )
    ap.add_argument(
        "--stat-messages", type=int, default=100_000, help="stat100k: messages (100000)"
    )
    ap.add_argument("--stat-size", type=int, default=5120, help="stat100k: octets (5120)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per mode; median (3)")
    ap.add_argument("--warmup", type=int, default=1, help="cold runs before, not in median (1)")
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds per run at most (300)")
    ap.add_argument("--io-timeout", type=float, default=60, help="seconds per socket read (60)")
    ap.add_argument("--settle", type=float, default=0.5, help="pause between runs, s (0.5)")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="also compare every message's content with what was written (client CPU)",
    )
    ap.add_argument(
        "--max-messages", type=int, default=1_000_000, help="refuse a bigger STAT (1000000)"
    )
    ap.add_argument(
        "--target", metavar="HOST:PORT", help="measure this running server instead of starting ours"
    )
    ap.add_argument("--user", help="with --target: the account (e.g. bob@example.test)")
    ap.add_argument("--password", help="with --target: its password")
    ap.add_argument("--maildir", help="with --target: the account's maildir (%%u %%d %%a)")
    ap.add_argument(
        "--pid",
        action="append",
        default=[],
        help="with --target: root PID(s) of the server (trees summed)",
    )
    ap.add_argument("--name", help="server label (default: mailserver, or HOST:PORT)")
    ap.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="with --target: use the mailbox as it is (not emptied, not filled)",
    )
    ap.add_argument(
        "--keep-mailbox", action="store_true", help="with --target: do not empty it at the end"
    )
    ap.add_argument("--port", type=int, default=0, help="our server's port (default: a free one)")
    ap.add_argument("--io-threads", type=int, default=8, help="our server's io_threads (8)")
    ap.add_argument(
        "--twistd",
        help="command that runs twistd (default: twistd from PATH, "
        "else python running twisted.scripts.twistd)",
    )
    ap.add_argument(
        "--work-dir",
        help="where our server's temporary directory goes "
        "(default: $TMPDIR): this is the file system measured",
    )
    ap.add_argument("--keep-dir", action="store_true", help="keep our server's directory")
    ap.add_argument("--start-timeout", type=float, default=60)
    ap.add_argument("--stop-timeout", type=float, default=20)
    ap.add_argument("--sample-interval", type=float, default=0.02, help="RSS sampling, s (0.02)")
    ap.add_argument("--pss-interval", type=float, default=0.5, help="PSS sampling, s; 0 = off")
    ap.add_argument("--results", help="also append every JSON line to this file")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}")
    if args.target and not (args.user and args.password is not None):
        ap.error("--target needs --user and --password")
    if args.target and args.fill and not args.maildir:
        ap.error("--target needs --maildir (or --no-fill)")
    if not args.target and (args.user or args.maildir or args.pid or not args.fill):
        ap.error("--user, --maildir, --pid and --no-fill go with --target")
    if args.verify and not args.fill:
        ap.error("--verify needs the mailbox filled by this script")
    if min(args.messages, args.size, args.window, args.big_size, args.stat_messages) < 1:
        ap.error("sizes, counts and --window must be positive")
    if args.runs < 1 or args.warmup < 0 or args.run_timeout <= 0 or args.io_timeout <= 0:
        ap.error("--runs must be positive, --warmup not negative, timeouts positive")
    if max(args.messages, args.stat_messages) > args.max_messages:
        ap.error("more messages than --max-messages")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)

    out = Output(args.results)
    server: OwnServer | None = None
    summaries: list[dict] = []
    mailboxes: dict[str, Mailbox] = {}
    try:
        kinds = {contents_for(args, m)[0]: contents_for(args, m) for m in args.modes}
        if args.target:
            host, _, port_s = args.target.rpartition(":")
            host, port = host or "127.0.0.1", int(port_s)
            if host not in ("127.0.0.1", "localhost"):
                sys.exit("only 127.0.0.1 may be a target")
            host = "127.0.0.1"
            local, _, domain = args.user.rpartition("@")
            md = (args.maildir or "").replace("%u", local).replace("%d", domain)
            shared = Mailbox(args.user, Path(md.replace("%a", args.user)))
            mailboxes = {k: shared for k in kinds}
            roots = [int(x) for p in args.pid for x in p.replace(",", " ").split()]
            name = args.name or f"{host}:{port}"
            args.user_for = lambda mbx: args.user
            if not wait_pop3(host, port, None, 10):
                sys.exit(f"no POP3 server answers on {host}:{port}")
        else:
            args.password = PASSWORD
            args.user_for = lambda mbx: mbx.account
            server = OwnServer(args)
            server.write_config()
            accounts = [f"bench-{k}@{DOMAIN}" for k in kinds]
            how = server.add_users(accounts)
            print(f"# accounts {', '.join(accounts)} added with {how}", file=sys.stderr)
            for k, a in zip(kinds, accounts, strict=True):
                mailboxes[k] = Mailbox(a, server.maildir(a))
            for k, (_, count, size) in kinds.items():  # before the server starts: cold
                secs = mailboxes[k].fill(count, size, args.verify)
                print(
                    f"# filled {mailboxes[k].path}: {count} x {size} in {secs:.1f}s",
                    file=sys.stderr,
                )
            server.start()
            host, port = "127.0.0.1", server.port
            roots = [server.pid]
            name = args.name or "mailserver"
        some = next(iter(mailboxes.values())).path
        out.emit(
            {
                "bench": "pop3-retr",
                "header": True,
                "server": name,
                "target": f"{host}:{port}",
                "server_pids": roots,
                "maildir_fs": filesystem_of(
                    next((p for p in (some, *some.parents) if p.exists()), Path.cwd())
                ),
                "modes": args.modes,
                "messages": args.messages,
                "size": args.size,
                "window": args.window,
                "big_size": args.big_size,
                "big_read_rate_mb_per_s": args.big_read_rate,
                "stat_messages": args.stat_messages,
                "runs": args.runs,
                "warmup": args.warmup,
                "verify": args.verify,
                "client": "raw socket (TCP_NODELAY, 256 KiB reads)",
                "python": platform.python_version(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        for mode in args.modes:
            kind, count, size = contents_for(args, mode)
            mbx = mailboxes[kind]
            if args.fill and mbx.contents != (count, size):
                secs = mbx.fill(count, size, args.verify)
                print(f"# filled {mbx.path}: {count} x {size} in {secs:.1f}s", file=sys.stderr)
            results = []
            for r in range(args.warmup + args.runs):
                warm = r < args.warmup
                run = r - args.warmup
                if mode == "stat100k":
                    res = run_stat(args, host, port, mbx, roots, run, warm, name)
                else:
                    res = run_retr(args, host, port, mbx, roots, mode, run, warm, name)
                out.emit(res)
                results.append(res)
                if server and server.proc and server.proc.poll() is not None:
                    raise RuntimeError("our server exited during the run; log: " + str(server.log))
                time.sleep(args.settle)
            s = summarize(mode, name, results)
            if mode == "big":
                s["size_mib"] = round(args.big_size / MIB, 1)
            out.emit(s)
            summaries.append(s)
    finally:
        if server is not None:
            server.stop()
        elif args.fill and not args.keep_mailbox:
            for mbx in {id(m): m for m in mailboxes.values()}.values():
                if mbx.contents is not None:
                    mbx.clear()
    if summaries:
        print("\n" + tables(summaries), flush=True)
    return 0 if all(s["ok_runs"] == s["runs"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
