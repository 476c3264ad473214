#!/usr/bin/env python3
"""
What the bench scripts share: measuring a server's process trees from /proc (CPU, peak RSS and
PSS), starting our server as a child process in a temporary directory, filling and counting
maildirs, the built-in SMTP load generator, results (JSON lines, medians, table cells).

The scripts are run as files (bench/x.py), so this directory is on their sys.path and they
import it as C{_common}. Run as a script it is the built-in SMTP load generator's child process
(C{_common.py smtp-client SPEC-JSON}, see L{client_main}). Python stdlib only; the project is
imported only as a fall-back when its `mailserver` command fails. Only 127.0.0.1 is ever
contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import random
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PASSWORD = "bench-password-1"
DOMAIN = "example.test"
SENDER = "sender@client.perf.test"
TWISTD_MAIN = "from twisted.scripts.twistd import run\nrun()\n"

# ----------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(b")") + 2 :].split()


def tree_pids(roots: list[int]) -> list[int]:
    """Every live PID in the process trees under C{roots} (roots included)."""
    children: dict[int, list[int]] = {}
    live = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        rest = _proc_stat(int(name))
        if rest is None:
            continue
        live.add(int(name))
        children.setdefault(int(rest[1]), []).append(int(name))
    out: list[int] = []
    stack = [r for r in roots if r in live]
    seen: set[int] = set()
    while stack and len(out) < 100_000:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        stack.extend(children.get(p, ()))
    return out


def tree_cpu_s(roots: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds summed over the trees: utime+cutime, stime+cstime."""
    user = system = 0
    for p in tree_pids(roots):
        rest = _proc_stat(p)
        if rest is not None:
            user += int(rest[11]) + int(rest[13])
            system += int(rest[12]) + int(rest[14])
    return user / CLK_TCK, system / CLK_TCK


def main_threads_cpu_s(roots: list[int]) -> float:
    """utime+stime of the main thread of each root (for our server: the reactor thread)."""
    ticks = 0
    for pid in roots:
        try:
            with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(b")") + 2 :].split()
        ticks += int(rest[11]) + int(rest[12])
    return ticks / CLK_TCK


def rss_kb(pid: int) -> int:
    """VmRSS, read from /proc/PID/statm (the same figure as /proc/PID/status, much cheaper)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(roots: list[int]) -> int:
    return sum(rss_kb(p) for p in tree_pids(roots))


def tree_mem(roots: list[int]) -> dict[str, float]:
    """RSS and PSS (KiB) summed over the process trees, and the number of processes."""
    pids = tree_pids(roots)
    threads = 0
    for p in pids:
        try:
            threads += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            pass
    return {
        "rss_kb": sum(rss_kb(p) for p in pids),
        "pss_kb": sum(pss_kb(p) for p in pids),
        "nproc": len(pids),
        "threads": threads,
    }


def host_cpu_snapshot() -> tuple[int, int, int, int]:
    """(idle, total, iowait, steal) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v[:8]), v[4], v[7]


def host_busy_since(snap: tuple[int, int, int, int]) -> dict[str, float | None]:
    """Busy (not idle, not iowait), iowait and steal fractions of all CPUs since C{snap}."""
    now = host_cpu_snapshot()
    dt = now[1] - snap[1]
    if not dt:
        return {"host_cpu_busy": None, "host_cpu_iowait": None, "host_cpu_steal": None}
    return {
        "host_cpu_busy": round(1 - (now[0] - snap[0]) / dt, 3),
        "host_cpu_iowait": round((now[2] - snap[2]) / dt, 3),
        "host_cpu_steal": round((now[3] - snap[3]) / dt, 3),
    }


class Sampler(threading.Thread):
    """
    Peak memory of the server trees: VmRSS summed every C{interval} s (the list of PIDs is
    refreshed every C{tree_interval} s), PSS every C{pss_interval} s (0: never). Stops by itself
    after C{max_seconds} or C{max_samples}.
    """

    def __init__(
        self,
        roots: list[int],
        interval: float,
        pss_interval: float,
        max_seconds: float,
        tree_interval: float = 0.5,
    ) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.roots = roots
        self.interval = interval
        self.pss_interval = pss_interval
        self.tree_interval = tree_interval
        self.max_seconds = max_seconds
        self.max_samples = int(max_seconds / max(interval, 0.001)) + 10
        self.stop_event = threading.Event()
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_nproc = 0
        self.samples = 0
        self.cpu_s = 0.0

    def run(self) -> None:
        t_end = time.monotonic() + self.max_seconds
        next_tree = next_pss = 0.0
        pids: list[int] = []
        while not self.stop_event.is_set() and self.samples < self.max_samples:
            now = time.monotonic()
            if now > t_end:
                break
            if now >= next_tree:
                pids = tree_pids(self.roots)
                self.peak_nproc = max(self.peak_nproc, len(pids))
                next_tree = now + self.tree_interval
            self.peak_rss_kb = max(self.peak_rss_kb, sum(rss_kb(p) for p in pids))
            if self.pss_interval > 0 and now >= next_pss:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_kb(p) for p in pids))
                next_pss = now + self.pss_interval
            self.samples += 1
            self.stop_event.wait(self.interval)
        self.cpu_s = time.thread_time()

    def stop(self) -> dict[str, object]:
        self.stop_event.set()
        self.join(timeout=30)
        return {
            "server_peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "server_peak_pss_mb": round(self.peak_pss_kb / 1024, 1) if self.pss_interval else None,
            "server_peak_nproc": self.peak_nproc,
            "sampler_samples": self.samples,
            "sampler_cpu_s": round(self.cpu_s, 3),
        }


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


def no_server_figures(res: dict, roots: list[int]) -> dict:
    """Without --pid there is nothing to measure: the server figures are null, not 0."""
    if not roots:
        for k in res:
            if k.startswith("server_"):
                res[k] = None
    return res


def end_session(res: dict, client: RawClient | None, roots: list[int], session0: tuple) -> None:
    """
    After a session: the client closed, 50 ms for a per-session server process to exit and be
    reaped, the server CPU of the whole session (since the L{cpu_mark} C{session0}) in C{res}.
    """
    if client is not None:
        client.close()
    time.sleep(0.05)
    res.update(cpu_delta(session0, cpu_mark(roots), "server_session"))


def run_mode(
    args: argparse.Namespace,
    out: Output,
    server: OwnServer | None,
    one: Callable[[int, bool], dict],
) -> list[dict]:
    """
    --warmup cold runs, then --runs measured ones: C{one(run, warmup)} makes a result line, which
    is emitted; our server must still run after each; --settle seconds between them.
    """
    results = []
    for r in range(args.warmup + args.runs):
        res = one(r - args.warmup, r < args.warmup)
        out.emit(res)
        results.append(res)
        if server:
            server.check_alive()
        time.sleep(args.settle)
    return results


# ----------------------------------------------------------------------------- raw clients

RECV = 256 * 1024


class RawClient:
    """
    A client on a blocking socket (TCP_NODELAY, C{rcvbuf}: SO_RCVBUF when not 0) whose answers
    are read into one buffer, C{RECV} octets at most a read; no read after C{deadline}.
    """

    def __init__(
        self, host: str, port: int, io_timeout: float, deadline: float, rcvbuf: int = 0
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
        self.bytes_in = 0
        self.recvs = 0

    def close(self) -> None:
        self.sock.close()

    def pace(self, now: float) -> None:
        """Called before every read (a client that reads slowly waits here)."""

    def _fill(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise TimeoutError("run deadline")
        self.pace(now)
        data = self.sock.recv(RECV)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.recvs += 1
        self.bytes_in += len(data)
        self.buf += data


class ProtocolError(Exception):
    """The server answered with an error, or something that is not the protocol."""


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench script's argument parser, its docstring as --help."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_modes(ap: argparse.ArgumentParser, value: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma separated --modes value, each one of C{allowed}."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    for m in modes:
        if m not in allowed:
            ap.error(f"unknown mode {m}")
    return modes


def add_compare_arg(ap: argparse.ArgumentParser, what: str) -> None:
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FILE",
        help=f"--results file of another server's run: its {what} go in the table (repeatable)",
    )


# ----------------------------------------------------------------------------- maildirs


def maildir_count(md: Path) -> int:
    n = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(md / sub) as it:
                for e in it:
                    if not e.name.startswith("."):
                        n += 1
        except FileNotFoundError:
            pass
    return n


def maildir_clear(md: Path) -> None:
    """Delete the messages of a maildir (new/ cur/ tmp/) and Dovecot's index files."""
    for sub in ("new", "cur", "tmp"):
        p = md / sub
        if p.is_dir():
            with os.scandir(p) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        os.unlink(e.path)
    if md.is_dir():
        for name in os.listdir(md):
            if name.startswith("dovecot") and (md / name).is_file():
                os.unlink(md / name)


def expand_maildir(fmt: str, address: str) -> Path:
    """A --maildir argument for C{address}: %u local part, %d domain, %a the address."""
    local, _, domain = address.rpartition("@")
    return Path(fmt.replace("%u", local).replace("%d", domain).replace("%a", address))


def filesystem_of(path: Path, with_mount: bool = False) -> str:
    """'device type' (and 'on mount point') of the mount holding C{path} (longest match)."""
    p = str(path.resolve())
    best = ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, f"{dev} {fstype}" + (f" on {mnt}" if with_mount else ""))
    except OSError:
        pass
    return best[1]


def existing_filesystem_of(path: Path) -> str:
    """L{filesystem_of} the nearest existing directory of C{path} (else the cwd)."""
    return filesystem_of(next((p for p in (path, *path.parents) if p.exists()), Path.cwd()))


# ----------------------------------------------------------------------------- mailboxes

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
    """One account's maildir, filled by a bench script (or used as it is with --no-fill)."""

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

    def fill_and_say(self, count: int, size: int, verify: bool) -> None:
        """L{fill}, and a line on stderr saying so."""
        secs = self.fill(count, size, verify)
        print(f"# filled {self.path}: {count} x {size} in {secs:.1f}s", file=sys.stderr)

    def clear(self) -> None:
        if self.path.is_dir():
            maildir_clear(self.path)
        self.contents = None


# ----------------------------------------------------------------------------- results


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec="{:.0f}") -> str:
    """A table cell: C{v} formatted, or a dash for None."""
    return "—" if v is None else spec.format(v)


class Output:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def emit(self, obj: dict) -> None:
        line = json.dumps(obj, sort_keys=True)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def machine() -> dict[str, object]:
    """What a header line says about the machine and the time."""
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_compare(paths: list[str], bench: str) -> list[dict]:
    """The summary lines of C{bench} in the --results files C{paths} (the last per key)."""
    found: dict[tuple, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("bench") == bench and obj.get("summary"):
                    key = (obj.get("server"), obj.get("mode"), obj.get("variant"), obj.get("conns"))
                    found[key] = obj
    return list(found.values())


def summary_of_runs(
    bench: str, mode: str, name: str, results: list[dict], cold_key: str = "msg_per_s"
) -> tuple[dict[str, object], Callable[[str], float | None], Callable[[str], float | None]]:
    """
    The summary line of one mode of a download bench (runs with a "warmup" flag), and the
    median and the maximum over the measured runs of a key, for the bench's own additions.
    """
    measured = [r for r in results if not r["warmup"]]
    ok = [r for r in measured if "error" not in r]

    def med(key: str) -> float | None:
        return median([r.get(key) for r in measured])

    def top(key: str) -> float | None:
        return max([r[key] for r in measured if r.get(key) is not None], default=None)

    s: dict[str, object] = {
        "bench": bench,
        "summary": True,
        "server": name,
        "mode": mode,
        "messages": median([r.get("messages") for r in results]),
        "runs": len(measured),
        "ok_runs": len(ok),
        "cold": [r.get(cold_key) for r in results if r["warmup"]],
        "median_server_cpu_s": med("server_cpu_s"),
        "median_client_cpu_s": med("client_cpu_s"),
        "max_server_peak_rss_mb": top("server_peak_rss_mb"),
        "max_server_peak_pss_mb": top("server_peak_pss_mb"),
        "median_host_cpu_busy": med("host_cpu_busy"),
    }
    return s, med, top


DOWNLOAD_TABLE_HEAD = [
    "| server | mode | msgs | **msg/s** | MB/s | msg/s, each run | cold msg/s | "
    "server CPU s (per 1000 msgs) | client CPU s | peak RSS MB | peak PSS MB | ok runs |",
    "|" + "---|" * 12,
]


def download_row(s: dict, mode: str) -> str:
    """A row of L{DOWNLOAD_TABLE_HEAD} for the summary C{s} (mode label C{mode})."""
    return (
        f"| {s['server']} | {mode} | {fmt(s['messages'])} | "
        f"**{fmt(s['median_msg_per_s'])}** | {fmt(s['median_mb_per_s'], '{:.1f}')} | "
        f"{', '.join(fmt(x) for x in s['all_msg_per_s'])} | "
        f"{', '.join(fmt(x) for x in s['cold']) or '—'} | "
        f"{fmt(s['median_server_cpu_s'], '{:.2f}')} "
        f"({fmt(s['median_server_cpu_s_per_1000_msgs'], '{:.3f}')}) | "
        f"{fmt(s['median_client_cpu_s'], '{:.2f}')} | "
        f"{fmt(s['max_server_peak_rss_mb'], '{:.1f}')} | "
        f"{fmt(s['max_server_peak_pss_mb'], '{:.1f}')} | {s['ok_runs']}/{s['runs']} |"
    )


# ----------------------------------------------------------------------------- command line


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP end a benchmark through its finally clauses (which stop the servers)."""

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)


def parse_target(target: str) -> tuple[str, int]:
    """--target HOST:PORT: loopback only (exits otherwise)."""
    host, _, port_s = target.rpartition(":")
    if host not in ("", "127.0.0.1", "localhost"):
        sys.exit("only 127.0.0.1 may be a target")
    return "127.0.0.1", int(port_s)


def parse_pids(pids: list[str]) -> list[int]:
    """--pid values: PIDs separated by spaces or commas, the option repeatable."""
    return [int(x) for p in pids for x in p.replace(",", " ").split()]


def add_pid_name_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--pid",
        action="append",
        default=[],
        help="with --target: root PID(s) of the server (trees summed)",
    )
    ap.add_argument("--name", help="server label (default: mailserver, or HOST:PORT)")


def add_server_args(ap: argparse.ArgumentParser, port: bool = True) -> None:
    """Options about starting our server ([--port,] --io-threads, --twistd, directories, times)."""
    if port:
        ap.add_argument(
            "--port", type=int, default=0, help="our server's port (default: a free one)"
        )
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


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sample-interval", type=float, default=0.02, help="RSS sampling, s (0.02)")
    ap.add_argument("--pss-interval", type=float, default=0.5, help="PSS sampling, s; 0 = off")
    ap.add_argument("--results", help="also append every JSON line to this file")


def add_download_args(ap: argparse.ArgumentParser, max_help: str) -> None:
    """The options of the download benches (POP3 RETR, IMAP FETCH) after their modes."""
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
    ap.add_argument("--max-messages", type=int, default=1_000_000, help=max_help)
    ap.add_argument(
        "--target", metavar="HOST:PORT", help="measure this running server instead of starting ours"
    )
    ap.add_argument("--user", help="with --target: the account (e.g. bob@example.test)")
    ap.add_argument("--password", help="with --target: its password")
    ap.add_argument("--maildir", help="with --target: the account's maildir (%%u %%d %%a)")
    add_pid_name_args(ap)
    ap.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="with --target: use the mailbox as it is (not emptied, not filled)",
    )
    ap.add_argument(
        "--keep-mailbox", action="store_true", help="with --target: do not empty it at the end"
    )
    add_server_args(ap)
    add_sampling_args(ap)


def check_download_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of L{add_download_args}'s options (modes are the bench's)."""
    if args.target and not (args.user and args.password is not None):
        ap.error("--target needs --user and --password")
    if args.target and args.fill and not args.maildir:
        ap.error("--target needs --maildir (or --no-fill)")
    if not args.target and (args.user or args.maildir or args.pid or not args.fill):
        ap.error("--user, --maildir, --pid and --no-fill go with --target")
    if args.verify and not args.fill:
        ap.error("--verify needs the mailbox filled by this script")
    if args.runs < 1 or args.warmup < 0 or args.run_timeout <= 0 or args.io_timeout <= 0:
        ap.error("--runs must be positive, --warmup not negative, timeouts positive")


def quoted(s: str) -> str:
    """An IMAP quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards C{want} (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# ----------------------------------------------------------------------------- our server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# listener kind: (greeting that shows the server is up, what ends the session, octets read)
GREETINGS = {
    "smtp": (b"220", b"QUIT\r\n", 512),
    "submission": (b"220", b"QUIT\r\n", 512),
    "pop3": (b"+OK", b"QUIT\r\n", 512),
    "imap": (b"* OK", b"z LOGOUT\r\n", 4096),
}


def wait_greeting(
    host: str, port: int, proc: subprocess.Popen | None, seconds: float, kind: str = "smtp"
) -> bool:
    """Wait (bounded) until the port answers with the greeting of C{kind} (GREETINGS)."""
    expect, bye, size = GREETINGS[kind]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(size)
                s.sendall(bye)
                if greeting.startswith(expect):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def command(name: str, module: str) -> list[str]:
    """The console script C{name} from PATH, else C{python -m module}."""
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


class OwnServer:
    """
    Our server in a temporary directory, started as a child process (`twistd -n mailserver`):
    C{listeners} are (kind, port, tls, allow_plaintext_auth) on 127.0.0.1, the first one is
    waited for; C{limits} the [limits] section; C{extra} more TOML (e.g. [[route]]); C{nofile}
    the server's RLIMIT_NOFILE (0: as inherited).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        prefix: str,
        listeners: list[tuple[str, int, str, bool]],
        domain: str = DOMAIN,
        limits: dict[str, int] | None = None,
        nofile: int = 0,
        extra: str = "",
    ) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=args.work_dir))
        self.data = self.dir / "data"
        self.cfg = self.dir / "mailserver.toml"
        self.log = self.dir / "server.out"
        self.listeners = listeners
        self.domain = domain
        self.limits = limits or {"connections": 1000, "connections_per_ip": 1000}
        self.nofile = nofile
        self.extra = extra
        self.port = listeners[0][1]
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def write_config(self) -> None:
        limits = "".join(f"{k} = {v}\n" for k, v in self.limits.items())
        listeners = "".join(
            f"""
[[listener]]
kind = "{kind}"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "{tls}"
"""
            + ("allow_plaintext_auth = true\n" if plain else "")
            for kind, port, tls, plain in self.listeners
        )
        self.cfg.write_text(
            f"""# written by bench/{Path(sys.argv[0]).name}
[server]
hostname = "mx.{self.domain}"
data_dir = "{self.data}"
domain = "{self.domain}"
io_threads = {self.args.io_threads}
shutdown_grace = "5s"

[limits]
{limits}{listeners}{self.extra}""",
            encoding="utf-8",
        )

    def add_users(self, accounts: list[str], cheap_hash: bool = False) -> str:
        """
        Create the domain and the accounts with the `mailserver` command (or the directory
        API if it fails); with C{cheap_hash} the accounts are added through the directory API
        with a cheap argon2id hash (t=1, m=1 MiB: a login costs about 1 ms instead of a
        quarter of a second), the domain still with the command.
        """
        cli = command("mailserver", "mailserver.cli")
        cfg = ["--config", str(self.cfg)]
        steps = [(cli + ["domain", "add", self.domain] + cfg, None)]
        if not cheap_hash:
            for a in accounts:
                steps.append((cli + ["user", "add", a, "--password-stdin"] + cfg, PASSWORD + "\n"))
        how = "mailserver CLI"
        try:
            for cmd, stdin in steps:
                r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"{shlex.join(cmd)}: {r.stderr.strip()}")
            if not cheap_hash:
                return how
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"# mailserver CLI failed ({e}); using the Python API", file=sys.stderr)
            how = "mailserver.directory API"
        if cheap_hash:
            from argon2 import PasswordHasher  # the project's dependency

            from mailserver.directory import SQLiteDirectory  # the project, installed

            db = self.data / "db"
            db.mkdir(mode=0o700, parents=True, exist_ok=True)
            hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
            directory = SQLiteDirectory(db / "directory.sqlite", self.domain, hasher=hasher)
        else:
            from mailserver.directory import open_directory  # the project, installed

            directory = open_directory(self.data, self.domain)
        try:
            if not directory.is_local_domain(self.domain):
                directory.add_domain(self.domain)
            for a in accounts:
                if not directory.user_exists(a):
                    directory.add_user(a, PASSWORD)
        finally:
            directory.close()
        if cheap_hash:
            how += " (domain), directory API with a cheap argon2id hash t=1 m=1MiB (accounts)"
        return how

    def maildir(self, account: str) -> Path:
        local, _, domain = account.rpartition("@")
        return self.data / "mail" / domain / local

    def twistd_args(self) -> list[str]:
        # Logged as under systemd (etc/systemd/mailserver.service): our observer, JSON lines on
        # standard output, which goes to server.out.
        return [
            "-n",
            "--pidfile=",
            "--logger=mailserver.log.observer",
            "mailserver",
            "--config",
            str(self.cfg),
        ]

    def server_command(self) -> list[str]:
        if self.args.twistd:
            return shlex.split(self.args.twistd) + self.twistd_args()
        twistd = shutil.which("twistd")
        base = [twistd] if twistd else [sys.executable, "-c", TWISTD_MAIN]
        return base + self.twistd_args()

    def _preexec(self) -> None:
        if self.nofile:
            raise_nofile(self.nofile)

    def start(self, note: str = "") -> None:
        """Start it and wait (bounded) for the first listener's greeting; stopped if none."""
        cmd = self.server_command()
        print(f"# our server: {shlex.join(cmd)}{note}", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "server.out", "wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=self._preexec if self.nofile else None,
        )
        kind = self.listeners[0][0]
        if not wait_greeting("127.0.0.1", self.port, self.proc, self.args.start_timeout, kind):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            out = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"server did not answer on port {self.port}\n{tail}\n{out}")

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise if the server has exited (during a run)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("our server exited during the run; log: " + str(self.log))

    def stop(self) -> None:
        """SIGTERM, SIGKILL after --stop-timeout; the directory removed (but --keep-dir)."""
        if self.stopped:
            return
        self.stopped = True
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


# ----------------------------------------------------------------------------- SMTP load


def smtp_body(size: int) -> bytes:
    """A body of C{size} bytes in 78-byte lines (no line starts with a dot)."""
    line = b"x" * 76 + b"\r\n"
    body = line * (size // 78)
    rest = size % 78
    if rest >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return body or b"\r\n"


async def smtp_load(spec: dict) -> dict[str, object]:
    """
    Send spec["messages"] messages over spec["concurrency"] SMTP sessions: EHLO, AUTH PLAIN
    when spec["auth"] is [user, password], then per message MAIL/RCPT/DATA pipelined and the
    message after the 354 (from spec.get("sender", SENDER)). One message per connection, or
    with spec["keepalive"] each session sends until none is left. spec["rcpt"] and
    spec["msgid"] may contain "{i}" (the message's number). With spec["barrier"] every session
    is set up first (connect, EHLO, AUTH), a line {"up": ...} is printed and nothing is sent
    before a line "send" on stdin.
    """
    host, port = spec["host"], spec["port"]
    keepalive = spec["keepalive"]
    remaining = [spec["messages"]]
    stats: dict = {"ok": 0, "failed": 0, "connections": 0, "errors": []}
    deadline = time.monotonic() + spec["timeout"]
    login = None
    if spec.get("auth"):
        user, password = spec["auth"]
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        login = b"AUTH PLAIN " + token + b"\r\n"
        stats["logins"] = 0
    fixed = "{i}" not in spec["rcpt"] + spec["msgid"]
    body = smtp_body(spec["size"])
    sender = spec.get("sender", SENDER)

    def envelope(i: int) -> tuple[bytes, bytes]:
        rcpt = spec["rcpt"].format(i=i)
        head = (
            f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {spec['subject']}\r\n"
            f"Message-ID: {spec['msgid'].format(i=i)}\r\n\r\n"
        ).encode()
        return (
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode(),
            head + body + b".\r\n",
        )

    same = envelope(0) if fixed else None

    async def reply(reader: asyncio.StreamReader) -> bytes:
        """One whole reply (last line), bounded in time."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("run deadline")
            line = await asyncio.wait_for(reader.readline(), timeout=min(left, 60))
            if not line:
                raise ConnectionError("connection closed")
            if len(line) < 4 or line[3:4] != b"-":
                return line

    def expect(line: bytes, code: bytes) -> None:
        if not line.startswith(code):
            raise RuntimeError(line.decode(errors="replace").strip())

    def take() -> int | None:
        if remaining[0] <= 0 or time.monotonic() > deadline:
            return None
        remaining[0] -= 1
        return spec["messages"] - remaining[0] - 1

    def note(e: Exception) -> None:
        if len(stats["errors"]) < 5:
            stats["errors"].append(f"{type(e).__name__}: {e}")

    async def open_session() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        try:
            stats["connections"] += 1
            expect(await reply(reader), b"220")
            writer.write(b"EHLO client.perf.test\r\n")
            expect(await reply(reader), b"250")
            if login is not None:
                writer.write(login)
                expect(await reply(reader), b"235")
                stats["logins"] += 1
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def session(taken: int | None, opened=None) -> None:
        writer = None
        try:
            reader, writer = opened or await open_session()
            if opened is not None:
                taken = take()
            while taken is not None:
                env, msg = same or envelope(taken)
                writer.write(env)
                stats.setdefault("t_first", time.monotonic())
                expect(await reply(reader), b"250")
                expect(await reply(reader), b"250")
                expect(await reply(reader), b"354")
                writer.write(msg)
                expect(await reply(reader), b"250")
                stats["ok"] += 1
                taken = None
                if keepalive:
                    taken = take()
            writer.write(b"QUIT\r\n")
            await reply(reader)
        except Exception as e:  # counted, never retried
            if taken is not None:
                stats["failed"] += 1
            note(e)
        finally:
            if writer is not None:
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), 5)
                except Exception:
                    pass

    async def worker() -> None:
        while (taken := take()) is not None:
            await session(taken)
            if keepalive:
                return

    if spec.get("barrier"):
        t_setup = time.monotonic()
        opened = await asyncio.gather(
            *(open_session() for _ in range(spec["concurrency"])), return_exceptions=True
        )
        up = [o for o in opened if not isinstance(o, BaseException)]
        for o in opened:
            if isinstance(o, Exception):
                note(o)
        print(
            json.dumps({"up": len(up), "setup_s": round(time.monotonic() - t_setup, 4)}),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() == "send":
            await asyncio.gather(*(session(None, o) for o in up))
        stats["failed"] += remaining[0]
    else:
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    stats["t_done"] = time.monotonic()
    return stats


def client_main(argv: list[str]) -> int:
    """The built-in load generator (a child process): prints 'ready', waits for 'go' on stdin."""
    if argv[:1] != ["smtp-client"] or len(argv) != 2:
        print("usage: _common.py smtp-client SPEC-JSON (see smtp_load)", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    stats = asyncio.run(smtp_load(spec))
    print(json.dumps(stats), flush=True)
    return 0 if stats["failed"] == 0 and stats["ok"] == spec["messages"] else 1


def start_client(spec: dict, errfile: Path) -> subprocess.Popen:
    """The built-in load generator started for C{spec}, ready: it starts at b"go\\n"."""
    cmd = [sys.executable, os.path.abspath(__file__), "smtp-client", json.dumps(spec)]
    err = open(errfile, "wb")
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    err.close()
    assert p.stdin and p.stdout
    if read_line(p, 30) != b"ready":
        p.kill()
        p.wait(10)
        raise RuntimeError("built-in client did not start; see " + str(errfile))
    return p


def read_line(p: subprocess.Popen, timeout: float) -> bytes | None:
    """One line of C{p}'s stdout (stripped), or None after C{timeout} s or at its exit."""
    assert p.stdout
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        return None
    line = p.stdout.readline()
    return line.strip() if line else None


class RunningLoad:
    """A started load generator; a thread records the moment it exits."""

    def __init__(self, p: subprocess.Popen, t0: float, errfile: Path, builtin: bool) -> None:
        self.p = p
        self.t0 = t0
        self.errfile = errfile
        self.builtin = builtin
        self.t_exit: float | None = None
        self.stdout = b""
        self._thread = threading.Thread(target=self._wait, daemon=True, name="load-wait")
        self._thread.start()

    def _wait(self) -> None:
        if self.builtin:
            assert self.p.stdout
            self.stdout = self.p.stdout.read(1 << 20)  # bounded; ends at EOF (exit)
        self.p.wait()
        self.t_exit = time.monotonic()

    def done(self) -> bool:
        return self.t_exit is not None

    def finish(self) -> dict[str, object]:
        """Stop it if it still runs (bounded), return what it reported."""
        if self.p.poll() is None:
            self.p.kill()
        self._thread.join(timeout=15)
        out: dict[str, object] = {"generator_rc": self.p.returncode}
        t_accept = self.t_exit
        if self.builtin and self.stdout:
            try:
                stats = json.loads(self.stdout.decode().strip().splitlines()[-1])
                t_accept = stats.pop("t_done", t_accept)
                if "t_first" in stats:
                    out["t_first"] = stats.pop("t_first")
                out["client"] = stats
            except (ValueError, IndexError):
                pass
        out["t_accept"] = t_accept
        try:
            err = self.errfile.read_bytes()[-600:].decode(errors="replace").strip()
        except OSError:
            err = ""
        if err:
            out["generator_stderr"] = err
        return out


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
