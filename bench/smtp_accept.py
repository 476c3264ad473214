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
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    SENDER,
    TWISTD_MAIN,
    Output,
    OwnServer,
    RunningLoad,
    Sampler,
    add_pid_name_args,
    add_sampling_args,
    add_server_args,
    existing_filesystem_of,
    exit_on_signals,
    expand_maildir,
    fmt,
    free_port,
    host_busy_since,
    host_cpu_snapshot,
    machine,
    maildir_clear,
    maildir_count,
    main_threads_cpu_s,
    median,
    new_parser,
    parse_modes,
    parse_pids,
    parse_target,
    start_client,
    tree_cpu_s,
    wait_greeting,
)

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
        spec = {
            "host": host,
            "port": port,
            "rcpt": rcpt,
            "msgid": "<bench@client.perf.test>",
            "subject": "perf smtp-accept",
            "messages": n,
            "size": size,
            "concurrency": conc,
            "keepalive": keepalive,
            "timeout": timeout,
        }
        p = start_client(spec, errfile)
        assert p.stdin
        t0 = time.monotonic()
        p.stdin.write(b"go\n")
        p.stdin.flush()
        return RunningLoad(p, t0, errfile, builtin=True)


# ----------------------------------------------------------------------------- our server


class ProfiledServer(OwnServer):
    """Our server (one plain SMTP listener), optionally under cProfile or py-spy."""

    def __init__(self, args: argparse.Namespace) -> None:
        domain = args.rcpt.rpartition("@")[2]
        port = args.port or free_port()
        super().__init__(args, "smtp-accept.", [("smtp", port, "none", False)], domain)
        self.profiler: subprocess.Popen | None = None

    def server_command(self) -> list[str]:
        prof = self.args.profile
        if prof and prof.startswith("cprofile:"):
            # cProfile runs a script file: a two-line twistd launcher in the server directory
            launcher = self.dir / "twistd_main.py"
            launcher.write_text(TWISTD_MAIN, encoding="utf-8")
            out = prof.split(":", 1)[1]
            return [sys.executable, "-m", "cProfile", "-o", out, str(launcher)] + self.twistd_args()
        return super().server_command()

    def start(self, note: str = "") -> None:
        self.write_config()
        how = self.add_users([self.args.rcpt])
        super().start(f"  (user added with {how})")
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

    def stop(self) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.profiler.wait(60)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait(10)
        super().stop()


# ----------------------------------------------------------------------------- the benchmark


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
    rep.pop("t_first", None)
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

        lines.append(
            f"| {s['server']} | {s['mode']} | {s['concurrency']} | "
            f"{fmt(s['median_accept_msg_per_s'])} | **{fmt(s['median_deliver_msg_per_s'])}** | "
            f"{', '.join(fmt(x) for x in s['all_deliver_msg_per_s'])} | "
            f"{fmt(s['median_server_cpu_s_per_1000_msgs'], '{:.2f}')} "
            f"({fmt(per1000(s['median_server_cpu_user_s']), '{:.2f}')}+"
            f"{fmt(per1000(s['median_server_cpu_sys_s']), '{:.2f}')}) | "
            f"{fmt(s['max_server_peak_rss_mb'], '{:.1f}')} | "
            f"{fmt(s['max_server_peak_pss_mb'], '{:.1f}')} | "
            f"{fmt(s['median_client_cpu_s'], '{:.2f}')} | {s['ok_runs']}/{s['runs']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = new_parser(__doc__)
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
    add_pid_name_args(ap)
    ap.add_argument(
        "--no-clean",
        dest="clean",
        action="store_false",
        help="do not empty the maildir before each run",
    )
    add_server_args(ap)
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
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    args.modes = parse_modes(ap, args.modes, ("per-connection", "keepalive"))
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

    exit_on_signals()  # SIGTERM/SIGHUP: through the finally below (which stops the server)
    out = Output(args.results)
    server: ProfiledServer | None = None
    summaries: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="smtp-accept-gen."))
    try:
        if args.target:
            host, port = parse_target(args.target)
            md = expand_maildir(args.maildir, args.rcpt)
            roots = parse_pids(args.pid)
            name = args.name or f"{host}:{port}"
            if not wait_greeting(host, port, None, 10):
                sys.exit(f"no SMTP server answers on {host}:{port}")
        else:
            server = ProfiledServer(args)
            server.start()
            host, port = "127.0.0.1", server.port
            md = server.maildir(args.rcpt)
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
                "maildir_fs": existing_filesystem_of(md),
                "n": args.messages,
                "size": args.size,
                "concurrency": args.concurrency,
                "modes": args.modes,
                "runs": args.runs,
                "profile": args.profile,
                **machine(),
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
                    if server:
                        server.check_alive()
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
