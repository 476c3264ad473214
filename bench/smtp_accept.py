#!/usr/bin/env python3
"""
SMTP accept -> maildir benchmark: how fast a server takes mail in and makes it durable.

Sends N messages of SIZE bytes to one recipient over C parallel SMTP sessions and measures, per
run:

  accept rate     N / time until the load generator got every reply (all 250s, QUIT done)
  delivered rate  N / time until N new files are in the recipient's maildir (new/ + cur/,
                  polled every 10 ms)
  server CPU      utime+stime of the server's process tree from /proc/PID/stat (children
                  included; also split into user and system, and the main thread's part:
                  for our server, the reactor thread), and CPU seconds per 1000 messages;
                  the host's busy, iowait and steal fractions
  server memory   peak VmRSS of the process tree (read from /proc/PID/statm: the same figure
                  as in /proc/PID/status, cheaper), sampled every 20 ms in a thread; and peak
                  PSS from smaps_rollup every 0.5 s (for multi-process servers RSS counts
                  shared pages once per process, PSS does not)
  load generator  its own CPU seconds (it shares the machine's cores with the server)

Both clocks start when the load generator starts sending. Every run prints one JSON line, every
setting (mode, C) a summary line with medians, and a table is printed at the end.

Two ways to use it:

  * our server (default): the script makes a temporary directory with a TOML configuration
    (one plain SMTP listener on 127.0.0.1, domain example.test), adds the recipient with the
    `mailserver` command, starts `twistd -n mailserver --config ...` as a child process, waits
    for the port, runs the benchmark and always stops the server at the end (SIGTERM, then
    SIGKILL after a bounded wait):

        bench/smtp_accept.py
        bench/smtp_accept.py --concurrency 50 --modes per-connection,keepalive --runs 5

  * an already running server (for example the Postfix + Dovecot reference stack):

        bench/smtp_accept.py --target 127.0.0.1:20025 --rcpt carol@example.test \\
            --maildir "$MAILDIR_FMT" --pid "$SERVER_PIDS" --name postfix-dovecot-lmtp

    --maildir may contain %u (local part), %d (domain), %a (address); --pid takes one or more
    root PIDs (space or comma separated, repeatable) whose whole process trees are measured.

The maildir is emptied before every run (files in new/ cur/ tmp/, and Dovecot's index files):
only point it at an idle test mailbox, or give --no-clean.

Load generator: Postfix's `smtp-source` (Debian package `postfix`) if found on PATH or in
/usr/sbin, else a built-in asyncio client (EHLO, then MAIL/RCPT/DATA pipelined), run as a
child process so that its CPU time is measured apart; --generator chooses. The one used is
printed.

Profiling our server: --profile cprofile:OUT runs it under `python -m cProfile -o OUT` (the
reactor thread only, wall-clock timer, start-up included); --profile py-spy:OUT attaches
`py-spy record --format raw --nonblocking` (needs `pip install py-spy`) for the whole
invocation. bench/profile_summary.py prints the top functions of either.

Requirements: Linux (/proc), Python >= 3.11, the project installed (for our server). Only
127.0.0.1 is ever contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-password-1"
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


PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


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


def _rss_kb(pid: int) -> int:
    """VmRSS, read from /proc/PID/statm (the same figure as /proc/PID/status, much cheaper)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_rss_kb(p) for p in pids))
            if self.pss_interval > 0 and now >= next_pss:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))
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


# ----------------------------------------------------------------------------- maildir helpers


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


def filesystem_of(path: Path) -> str:
    """'device type' of the mount holding C{path} (longest matching mount point)."""
    p = str(path.resolve())
    best = ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, f"{dev} {fstype}")
    except OSError:
        pass
    return best[1]


# ----------------------------------------------------------------------------- built-in client


def make_message(size: int, rcpt: str) -> bytes:
    """Headers plus a body of C{size} bytes in 78-byte lines (no line starts with a dot)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: perf smtp-accept\r\n"
        "Message-ID: <bench@client.perf.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // 78)
    rest = size % 78
    if rest >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + (body or b"\r\n")


async def _client(args: argparse.Namespace) -> dict[str, object]:
    host, port = args.host, args.port
    message = make_message(args.size, args.rcpt) + b".\r\n"
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{args.rcpt}>\r\nDATA\r\n".encode()
    remaining = [args.messages]
    stats = {"ok": 0, "failed": 0, "connections": 0, "errors": []}
    deadline = time.monotonic() + args.timeout

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

    def take() -> bool:
        if remaining[0] <= 0 or time.monotonic() > deadline:
            return False
        remaining[0] -= 1
        return True

    async def session(first_taken: bool) -> None:
        taken = first_taken
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            stats["connections"] += 1
            expect(await reply(reader), b"220")
            writer.write(b"EHLO client.perf.test\r\n")
            ehlo = await reply(reader)
            expect(ehlo, b"250")
            while taken:
                writer.write(envelope)
                expect(await reply(reader), b"250")
                expect(await reply(reader), b"250")
                expect(await reply(reader), b"354")
                writer.write(message)
                expect(await reply(reader), b"250")
                stats["ok"] += 1
                taken = False
                if args.keepalive:
                    taken = take()
            writer.write(b"QUIT\r\n")
            await reply(reader)
        except Exception as e:  # counted, never retried
            if taken:
                stats["failed"] += 1
            if len(stats["errors"]) < 5:
                stats["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            if writer is not None:
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), 5)
                except Exception:
                    pass

    async def worker() -> None:
        while take():
            await session(True)
            if args.keepalive:
                return

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    stats["t_done"] = time.monotonic()
    return stats


def client_main(argv: list[str]) -> int:
    """The built-in load generator (a child process): prints 'ready', waits for 'go' on stdin."""
    ap = argparse.ArgumentParser(prog="smtp_accept.py --internal-client")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rcpt", required=True)
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--keepalive", action="store_true")
    ap.add_argument("--timeout", type=float, required=True)
    args = ap.parse_args(argv)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    stats = asyncio.run(_client(args))
    print(json.dumps(stats), flush=True)
    return 0 if stats["failed"] == 0 and stats["ok"] == args.messages else 1


# ----------------------------------------------------------------------------- load generator


class Generator:
    """Runs one load: smtp-source or the built-in client, as a child process."""

    def __init__(self, kind: str, smtp_source: str | None) -> None:
        self.kind = kind
        self.smtp_source = smtp_source

    def describe(self) -> str:
        if self.kind == "smtp-source":
            return f"smtp-source ({self.smtp_source})"
        return "built-in asyncio client (EHLO, then MAIL/RCPT/DATA pipelined)"

    def run(
        self,
        host: str,
        port: int,
        rcpt: str,
        n: int,
        size: int,
        conc: int,
        keepalive: bool,
        timeout: float,
        errfile: Path,
    ) -> RunningLoad:
        if self.kind == "smtp-source":
            assert self.smtp_source
            cmd = [self.smtp_source]
            if keepalive:
                cmd.append("-d")
            cmd += [
                "-s",
                str(conc),
                "-m",
                str(n),
                "-l",
                str(size),
                "-M",
                "client.perf.test",
                "-f",
                SENDER,
                "-t",
                rcpt,
                "-S",
                "perf smtp-accept",
                f"{host}:{port}",
            ]
            err = open(errfile, "wb")
            t0 = time.monotonic()
            p = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
            err.close()
            return RunningLoad(p, t0, errfile, builtin=False)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--internal-client",
            "--host",
            host,
            "--port",
            str(port),
            "--rcpt",
            rcpt,
            "--messages",
            str(n),
            "--size",
            str(size),
            "--concurrency",
            str(conc),
            "--timeout",
            str(timeout),
        ]
        if keepalive:
            cmd.append("--keepalive")
        err = open(errfile, "wb")
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        err.close()
        assert p.stdin and p.stdout
        ready, _, _ = select.select([p.stdout], [], [], 30)
        if not ready or p.stdout.readline().strip() != b"ready":
            p.kill()
            p.wait(10)
            raise RuntimeError("built-in client did not start; see " + str(errfile))
        t0 = time.monotonic()
        p.stdin.write(b"go\n")
        p.stdin.flush()
        return RunningLoad(p, t0, errfile, builtin=True)


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


# ----------------------------------------------------------------------------- our server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen | None, seconds: float) -> bool:
    """Wait (bounded) until the port answers with an SMTP greeting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if greeting.startswith(b"220"):
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
    """Our server in a temporary directory, started as a child process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="smtp-accept.", dir=args.work_dir))
        self.data = self.dir / "data"
        self.cfg = self.dir / "mailserver.toml"
        self.log = self.dir / "server.log"
        self.port = args.port or free_port()
        self.proc: subprocess.Popen | None = None
        self.profiler: subprocess.Popen | None = None

    def write_config(self) -> None:
        domain = self.args.rcpt.rpartition("@")[2]
        self.cfg.write_text(
            f"""# written by bench/smtp_accept.py
[server]
hostname = "mx.{domain}"
data_dir = "{self.data}"
domain = "{domain}"
io_threads = {self.args.io_threads}
shutdown_grace = "5s"

[limits]
connections = 1000
connections_per_ip = 1000

[[listener]]
kind = "smtp"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "none"
""",
            encoding="utf-8",
        )

    def add_user(self) -> str:
        """Create the domain and the recipient with the `mailserver` command (or its API)."""
        domain = self.args.rcpt.rpartition("@")[2]
        cli = command("mailserver", "mailserver.cli")
        cfg = ["--config", str(self.cfg)]
        steps = [
            (cli + ["domain", "add", domain] + cfg, None),
            (cli + ["user", "add", self.args.rcpt, "--password-stdin"] + cfg, PASSWORD + "\n"),
        ]
        try:
            for cmd, stdin in steps:
                r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"{shlex.join(cmd)}: {r.stderr.strip()}")
            return "mailserver CLI"
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"# mailserver CLI failed ({e}); using the Python API", file=sys.stderr)
        from mailserver.directory import open_directory  # the project, installed

        directory = open_directory(self.data, domain)
        try:
            if not directory.is_local_domain(domain):
                directory.add_domain(domain)
            if not directory.user_exists(self.args.rcpt):
                directory.add_user(self.args.rcpt, PASSWORD)
        finally:
            directory.close()
        return "mailserver.directory API"

    def server_command(self) -> list[str]:
        twistd_args = [
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "mailserver",
            "--config",
            str(self.cfg),
        ]
        prof = self.args.profile
        if prof and prof.startswith("cprofile:"):
            # cProfile runs a script file: a two-line twistd launcher in the server directory
            launcher = self.dir / "twistd_main.py"
            launcher.write_text(TWISTD_MAIN, encoding="utf-8")
            out = prof.split(":", 1)[1]
            return [sys.executable, "-m", "cProfile", "-o", out, str(launcher)] + twistd_args
        if self.args.twistd:
            return shlex.split(self.args.twistd) + twistd_args
        twistd = shutil.which("twistd")
        base = [twistd] if twistd else [sys.executable, "-c", TWISTD_MAIN]
        return base + twistd_args

    def start(self) -> None:
        self.write_config()
        how = self.add_user()
        cmd = self.server_command()
        print(f"# our server: {shlex.join(cmd)}  (user added with {how})", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "server.out", "wb"),
            stderr=subprocess.STDOUT,
        )
        if not wait_port("127.0.0.1", self.port, self.proc, self.args.start_timeout):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            out = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server did not open port {self.port}\n{tail}\n{out}")
        prof = self.args.profile
        if prof and prof.startswith("py-spy:"):
            out = prof.split(":", 1)[1]
            pyspy = shutil.which("py-spy")
            if not pyspy:
                raise RuntimeError("py-spy not found (pip install py-spy)")
            self.profiler = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(self.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    str(self.args.profile_rate),
                    "--output",
                    out,
                ]
                + shlex.split(self.args.pyspy_flags),
                stdin=subprocess.DEVNULL,
                stdout=open(self.dir / "py-spy.out", "wb"),
                stderr=subprocess.STDOUT,
            )
            time.sleep(1.0)  # let it attach
            if self.profiler.poll() is not None:
                raise RuntimeError(
                    "py-spy exited: " + (self.dir / "py-spy.out").read_text(errors="replace")
                )

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def maildir(self) -> Path:
        local, _, domain = self.args.rcpt.rpartition("@")
        return self.data / "mail" / domain / local

    def stop(self) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.profiler.wait(60)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait(10)
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


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class Output:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def emit(self, obj: dict) -> None:
        line = json.dumps(obj, sort_keys=True)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def one_run(args, gen, host, port, md, roots, conc, keepalive, run, name, errfile) -> dict:
    n = args.messages
    if args.clean:
        maildir_clear(md)
    base = maildir_count(md)
    sampler = Sampler(roots, args.sample_interval, args.pss_interval, args.run_timeout + 30)
    cpu0 = tree_cpu_s(roots)
    main0 = main_threads_cpu_s(roots)
    busy0 = host_cpu_snapshot()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler.start()
    load = gen.run(host, port, args.rcpt, n, args.size, conc, keepalive, args.run_timeout, errfile)
    t0 = load.t0
    deadline = t0 + args.run_timeout
    t_del = None
    got = 0
    polls = 0
    while time.monotonic() < deadline and polls < args.run_timeout * 200:
        polls += 1
        if load.done() and load.p.returncode not in (0, None):
            deadline = min(deadline, (load.t_exit or t0) + 10)  # it gave up: don't wait long
        if t_del is None:
            got = maildir_count(md) - base
            if got >= n:
                t_del = time.monotonic()
        if t_del is not None and load.done():
            break
        time.sleep(0.01)
    rep = load.finish()
    cpu1 = tree_cpu_s(roots)
    main1 = main_threads_cpu_s(roots)
    host = host_busy_since(busy0)
    mem = sampler.stop()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if t_del is None:
        got = maildir_count(md) - base
    t_acc = rep.pop("t_accept")
    cpu_total = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    res: dict[str, object] = {
        "bench": "smtp-accept",
        "server": name,
        "generator": gen.kind,
        "mode": "keepalive" if keepalive else "per-connection",
        "concurrency": conc,
        "n": n,
        "size": args.size,
        "run": run,
        "accept_s": round(t_acc - t0, 3) if t_acc else None,
        "accept_msg_per_s": round(n / (t_acc - t0), 1) if t_acc else None,
        "delivered": got,
        "deliver_s": round(t_del - t0, 3) if t_del else None,
        "deliver_msg_per_s": round(n / (t_del - t0), 1) if t_del else None,
        "server_cpu_s": round(cpu_total, 2),
        "server_cpu_user_s": round(cpu1[0] - cpu0[0], 2),
        "server_cpu_sys_s": round(cpu1[1] - cpu0[1], 2),
        "server_cpu_s_per_1000_msgs": round(cpu_total * 1000 / n, 3),
        "server_main_thread_cpu_s": round(main1 - main0, 2),
        "client_cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 2),
    }
    res.update(host)
    res.update(mem)
    res.update(rep)
    problems = []
    if t_del is None:
        problems.append(f"delivered {got}/{n} within {args.run_timeout}s")
    if rep.get("generator_rc") not in (0,):
        problems.append(f"load generator exit code {rep.get('generator_rc')}")
    if problems:
        res["error"] = "; ".join(problems)
    return res


def table(summaries: list[dict]) -> str:
    head = (
        "| server | mode | C | accept msg/s | delivered msg/s | delivered, each run | "
        "CPU-s/1000 msgs (user+sys) | peak RSS MB | peak PSS MB | generator CPU s | ok runs |"
    )
    lines = [head, "|" + "---|" * 11]
    for s in summaries:

        def per1000(v, n=s["n"]):
            return None if v is None else v * 1000 / n

        def f(v, fmt="{:.0f}"):
            return "—" if v is None else fmt.format(v)

        lines.append(
            f"| {s['server']} | {s['mode']} | {s['concurrency']} | "
            f"{f(s['median_accept_msg_per_s'])} | **{f(s['median_deliver_msg_per_s'])}** | "
            f"{', '.join(f(x) for x in s['all_deliver_msg_per_s'])} | "
            f"{f(s['median_server_cpu_s_per_1000_msgs'], '{:.2f}')} "
            f"({f(per1000(s['median_server_cpu_user_s']), '{:.2f}')}+"
            f"{f(per1000(s['median_server_cpu_sys_s']), '{:.2f}')}) | "
            f"{f(s['max_server_peak_rss_mb'], '{:.1f}')} | "
            f"{f(s['max_server_peak_pss_mb'], '{:.1f}')} | "
            f"{f(s['median_client_cpu_s'], '{:.2f}')} | {s['ok_runs']}/{s['runs']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", "--messages", type=int, default=2000, help="messages per run (2000)")
    ap.add_argument("--size", type=int, default=5120, help="payload bytes per message (5120)")
    ap.add_argument("--concurrency", default="1,10,50", help="SMTP sessions in parallel (1,10,50)")
    ap.add_argument(
        "--modes",
        default="per-connection",
        help="per-connection (one message per connection) and/or keepalive "
        "(many per connection), comma separated (per-connection)",
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per setting; median reported (3)")
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds per run at most (300)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between runs, s (1)")
    ap.add_argument("--rcpt", default="carol@example.test", help="recipient (carol@example.test)")
    ap.add_argument("--generator", choices=("auto", "smtp-source", "builtin"), default="auto")
    ap.add_argument("--smtp-source", help="smtp-source binary (default: PATH, /usr/sbin)")
    ap.add_argument(
        "--target", metavar="HOST:PORT", help="measure this running server instead of starting ours"
    )
    ap.add_argument("--maildir", help="with --target: the recipient's maildir (%%u %%d %%a)")
    ap.add_argument(
        "--pid",
        action="append",
        default=[],
        help="with --target: root PID(s) of the server (trees summed)",
    )
    ap.add_argument("--name", help="server label (default: mailserver, or HOST:PORT)")
    ap.add_argument(
        "--no-clean",
        dest="clean",
        action="store_false",
        help="do not empty the maildir before each run",
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
    ap.add_argument(
        "--profile",
        metavar="cprofile:OUT|py-spy:OUT",
        help="profile our server: under cProfile, or py-spy record (raw format)",
    )
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (200)")
    ap.add_argument(
        "--pyspy-flags",
        default="--nonblocking",
        help="more py-spy record flags (default: --nonblocking: do not pause the "
        "server to sample; py-spy counts a thread blocked in fsync as active)",
    )
    ap.add_argument("--sample-interval", type=float, default=0.02, help="RSS sampling, s (0.02)")
    ap.add_argument("--pss-interval", type=float, default=0.5, help="PSS sampling, s; 0 = off")
    ap.add_argument("--results", help="also append every JSON line to this file")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("per-connection", "keepalive"):
            ap.error(f"unknown mode {m}")
    args.concurrency = [int(x) for x in args.concurrency.replace(" ", ",").split(",") if x]
    if args.target and not args.maildir:
        ap.error("--target needs --maildir")
    if args.profile and (
        args.target
        or args.profile.split(":", 1)[0] not in ("cprofile", "py-spy")
        or ":" not in args.profile
    ):
        ap.error("--profile is cprofile:OUT or py-spy:OUT, for our server only")
    if args.messages < 1 or args.runs < 1 or args.run_timeout <= 0:
        ap.error("--messages, --runs and --run-timeout must be positive")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--internal-client"]:
        return client_main(argv[1:])
    args = parse_args(argv)

    smtp_source = args.smtp_source or shutil.which("smtp-source")
    if not smtp_source and os.access("/usr/sbin/smtp-source", os.X_OK):
        smtp_source = "/usr/sbin/smtp-source"
    if args.generator == "smtp-source" and not smtp_source:
        sys.exit("smtp-source not found (Debian package postfix)")
    kind = (
        args.generator
        if args.generator != "auto"
        else ("smtp-source" if smtp_source else "builtin")
    )
    gen = Generator(kind, smtp_source)
    print(f"# load generator: {gen.describe()}", file=sys.stderr)

    # SIGTERM/SIGHUP end the benchmark through the finally below (which stops the server)
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)

    out = Output(args.results)
    server: OwnServer | None = None
    summaries: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="smtp-accept-gen."))
    try:
        if args.target:
            host, _, port_s = args.target.rpartition(":")
            host, port = host or "127.0.0.1", int(port_s)
            if host not in ("127.0.0.1", "localhost"):
                sys.exit("only 127.0.0.1 may be a target")
            host = "127.0.0.1"
            local, _, domain = args.rcpt.rpartition("@")
            md = Path(
                args.maildir.replace("%u", local).replace("%d", domain).replace("%a", args.rcpt)
            )
            roots = [int(x) for p in args.pid for x in p.replace(",", " ").split()]
            name = args.name or f"{host}:{port}"
            if not wait_port(host, port, None, 10):
                sys.exit(f"no SMTP server answers on {host}:{port}")
        else:
            server = OwnServer(args)
            server.start()
            host, port = "127.0.0.1", server.port
            md = server.maildir()
            roots = [server.pid]
            name = args.name or "mailserver"
        out.emit(
            {
                "bench": "smtp-accept",
                "header": True,
                "server": name,
                "generator": gen.describe(),
                "target": f"{host}:{port}",
                "server_pids": roots,
                "maildir_fs": filesystem_of(
                    next((p for p in (md, *md.parents) if p.exists()), Path.cwd())
                ),
                "n": args.messages,
                "size": args.size,
                "concurrency": args.concurrency,
                "modes": args.modes,
                "runs": args.runs,
                "profile": args.profile,
                "python": platform.python_version(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        for mode in args.modes:
            keepalive = mode == "keepalive"
            for conc in args.concurrency:
                results = []
                for run in range(args.runs):
                    res = one_run(
                        args,
                        gen,
                        host,
                        port,
                        md,
                        roots,
                        conc,
                        keepalive,
                        run,
                        name,
                        scratch / "generator.err",
                    )
                    out.emit(res)
                    results.append(res)
                    if server and server.proc and server.proc.poll() is not None:
                        raise RuntimeError(
                            "our server exited during the run; log: " + str(server.log)
                        )
                    time.sleep(args.settle)
                ok = [r for r in results if "error" not in r]
                s = {
                    "bench": "smtp-accept",
                    "summary": True,
                    "server": name,
                    "generator": gen.kind,
                    "mode": mode,
                    "concurrency": conc,
                    "n": args.messages,
                    "size": args.size,
                    "runs": len(results),
                    "ok_runs": len(ok),
                    "median_accept_msg_per_s": median([r["accept_msg_per_s"] for r in results]),
                    "median_deliver_msg_per_s": median([r["deliver_msg_per_s"] for r in results]),
                    "all_deliver_msg_per_s": [r["deliver_msg_per_s"] for r in results],
                    "median_server_cpu_s": median([r["server_cpu_s"] for r in results]),
                    "median_server_cpu_s_per_1000_msgs": median(
                        [r["server_cpu_s_per_1000_msgs"] for r in results]
                    ),
                    "max_server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in results),
                    "max_server_peak_pss_mb": max(
                        [
                            r["server_peak_pss_mb"]
                            for r in results
                            if r["server_peak_pss_mb"] is not None
                        ],
                        default=None,
                    ),
                    "median_client_cpu_s": median([r["client_cpu_s"] for r in results]),
                    "median_server_main_thread_cpu_s": median(
                        [r["server_main_thread_cpu_s"] for r in results]
                    ),
                    "median_server_cpu_user_s": median([r["server_cpu_user_s"] for r in results]),
                    "median_server_cpu_sys_s": median([r["server_cpu_sys_s"] for r in results]),
                    "median_host_cpu_busy": median([r["host_cpu_busy"] for r in results]),
                    "median_host_cpu_steal": median([r["host_cpu_steal"] for r in results]),
                }
                out.emit(s)
                summaries.append(s)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    if summaries:
        print("\n" + table(summaries), flush=True)
    return 0 if all(s["ok_runs"] == s["runs"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
