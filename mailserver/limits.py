# -*- test-case-name: tests.test_limits -*-
"""
Limits shared by every listener (DESIGN.md §5): connection counting (a total and a per-client
limit) and the throttling of failed logins, where a client is an IPv4 address or an IPv6 /64
(one customer's prefix).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IReactorTime


def client_key(host: str) -> str:
    """The unit that per-client limits count: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class ConnectionLimiter:
    """
    Counts open connections in total and per client.

    @ivar total: connections open now.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._per_client: dict[str, int] = {}

    def acquire(self, host: str) -> str | None:
        """
        Count a new connection from C{host}.

        @return: C{None} if it may go on (then call L{release} when it ends), or the reason it
            may not (C{"total"} or C{"per-client"}).
        """
        if self.total >= self.max_total:
            return "total"
        key = client_key(host)
        n = self._per_client.get(key, 0)
        if n >= self.max_per_client:
            return "per-client"
        self._per_client[key] = n + 1
        self.total += 1
        return None

    def release(self, host: str) -> None:
        """A connection counted by L{acquire} has ended."""
        key = client_key(host)
        n = self._per_client.get(key, 0)
        if n <= 1:
            self._per_client.pop(key, None)
        else:
            self._per_client[key] = n - 1
        self.total = max(0, self.total - 1)


_ACCOUNT_STEPS_MAX = 32  # doublings of the delay an account's history can ever ask for


class AuthThrottle:
    """
    Failed logins counted per client and per account (DESIGN.md §5).

    A client (L{client_key}: an IPv4 address or an IPv6 /64) may fail C{max_failures} times in
    C{window} seconds; after that L{refused} is true until its oldest counted failure is older
    than C{window}. Every failure's reply waits L{failed}'s answer, C{delay} seconds; an account
    with more than C{max_failures} failures in the window, from anywhere, makes that wait double
    with each further failure, up to C{max_delay}. An account is never refused: that would let
    anyone lock a user out of their mail by guessing wrong on purpose. The real user, from
    another address, gets in at once (a success is never delayed).

    Checks still running do not count as failures (a mail client opens several connections
    and logs in on all of them at once), but a client may have at most C{max_pending} at a
    time, and the caller asks L{refused} again right before each check runs: so a client
    sending guesses in parallel gets at most C{max_failures} plus the few checks already
    running.

    Memory is bounded: failures older than C{window} are forgotten, and at most C{max_clients}
    clients and C{max_accounts} accounts are tracked; past that, the one whose last failure is
    oldest is forgotten first (a client with that many addresses has that many guesses anyway).
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_failures: int = 5,
        window: float = 600.0,
        delay: float = 2.0,
        *,
        max_delay: float = 30.0,
        max_clients: int = 10_000,
        max_accounts: int = 10_000,
        max_pending: int = 32,
    ) -> None:
        """
        @param clock: the time source, C{seconds()} only.
        @param max_failures: failures one client may make in C{window} (at least 1).
        @param window: seconds a failure counts.
        @param delay: seconds a failed login's reply waits.
        @param max_delay: the longest wait a much-attacked account causes (never less than
            C{delay}).
        """
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.delay = delay
        self.max_delay = max(max_delay, delay)
        self.max_clients = max_clients
        self.max_accounts = max_accounts
        self.max_pending = max_pending
        # Both dicts are ordered by last failure, oldest first: expired and evicted entries are
        # always at the front. A client's list holds (time, account) for its newest failures,
        # at most max_failures of them, which is all that refused() needs.
        self._clients: dict[str, list[tuple[float, str]]] = {}
        # An account's list holds the times of its newest failures: just enough of them to
        # reach max_delay.
        self._accounts: dict[str, list[float]] = {}
        self._account_history = max_failures + self._steps_to_cap()
        self._pending: dict[str, int] = {}

    def _steps_to_cap(self) -> int:
        """How many doublings take C{delay} to C{max_delay}."""
        if self.delay <= 0:
            return 0
        steps = 0
        d = self.delay
        while d < self.max_delay and steps < _ACCOUNT_STEPS_MAX:
            d *= 2
            steps += 1
        return steps

    @property
    def tracked(self) -> tuple[int, int]:
        """How many clients and accounts have failures on record now (for tests, metrics)."""
        self._expire(self.clock.seconds())
        return len(self._clients), len(self._accounts)

    def _expire(self, now: float) -> None:
        """Forget clients and accounts whose last failure is out of the window."""
        horizon = now - self.window
        clients = self._clients
        while clients:
            key = next(iter(clients))
            if clients[key][-1][0] > horizon:
                break
            del clients[key]
        accounts = self._accounts
        while accounts:
            key = next(iter(accounts))
            if accounts[key][-1] > horizon:
                break
            del accounts[key]

    def _recent(self, key: str, now: float) -> int:
        """Failures of client C{key} inside the window."""
        horizon = now - self.window
        return sum(1 for t, _ in self._clients.get(key, ()) if t > horizon)

    def refused(self, host: str) -> bool:
        """
        Whether a login from C{host} must be refused at once, with no password check: its
        client has made C{max_failures} failures in the window.
        """
        now = self.clock.seconds()
        return self._recent(client_key(host), now) >= self.max_failures

    def attempt(self, host: str) -> AuthAttempt | None:
        """
        Begin a login from C{host}.

        @return: C{None} when L{refused}; else the attempt, counted against its client until it
            ends with L{AuthAttempt.failed}, L{AuthAttempt.succeeded} or L{AuthAttempt.abandon}.
        """
        key = client_key(host)
        if self.refused(host) or self._pending.get(key, 0) >= self.max_pending:
            return None
        self._pending[key] = self._pending.get(key, 0) + 1
        return AuthAttempt(self, host, key)

    def _end(self, key: str) -> None:
        n = self._pending.get(key, 0)
        if n <= 1:
            self._pending.pop(key, None)
        else:
            self._pending[key] = n - 1

    def failed(self, host: str, account: str) -> float:
        """
        Record a failed login for C{account} from C{host}.

        @param account: the name tried, normalized, so that spellings of one account count as
            one.
        @return: seconds to wait before replying.
        """
        now = self.clock.seconds()
        self._expire(now)
        horizon = now - self.window

        key = client_key(host)
        history = self._clients.pop(key, [])
        history = [entry for entry in history if entry[0] > horizon]
        history.append((now, account))
        self._clients[key] = history[-self.max_failures :]
        while len(self._clients) > self.max_clients:
            del self._clients[next(iter(self._clients))]

        times = self._accounts.pop(account, [])
        times = [t for t in times if t > horizon]
        times.append(now)
        self._accounts[account] = times[-self._account_history :]
        while len(self._accounts) > self.max_accounts:
            del self._accounts[next(iter(self._accounts))]

        beyond = len(times) - self.max_failures
        if beyond <= 0:
            return self.delay
        return min(self.delay * 2.0 ** min(beyond, _ACCOUNT_STEPS_MAX), self.max_delay)

    def succeeded(self, host: str, account: str) -> None:
        """
        Record a successful login for C{account} from C{host}: this client's failures for that
        account were typing mistakes and no longer count. Its failures for other accounts still
        do, so logging in to one's own account cannot buy more guesses at another. The account's
        failures from elsewhere still count too: an attack on it goes on.
        """
        key = client_key(host)
        history = self._clients.get(key)
        if history is None:
            return
        # Kept in its place: the order by last failure may then be slightly off, which only
        # delays the clean-up of entries behind it (refused() checks times itself).
        kept = [entry for entry in history if entry[1] != account]
        if kept:
            self._clients[key] = kept
        else:
            del self._clients[key]


class AuthAttempt:
    """One login in progress, from L{AuthThrottle.attempt}; ends once, by one of its methods."""

    def __init__(self, throttle: AuthThrottle, host: str, key: str) -> None:
        self._throttle = throttle
        self.host = host
        self._key = key
        self._open = True

    def _close(self) -> bool:
        if not self._open:
            return False
        self._open = False
        self._throttle._end(self._key)
        return True

    def failed(self, account: str) -> float:
        """
        The password was wrong (L{AuthThrottle.failed}).

        @return: seconds to wait before replying.
        """
        if not self._close():
            return self._throttle.delay
        return self._throttle.failed(self.host, account)

    def succeeded(self, account: str) -> None:
        """The password was right (L{AuthThrottle.succeeded})."""
        if self._close():
            self._throttle.succeeded(self.host, account)

    def abandon(self) -> None:
        """The check could not be made (an internal error): count nothing."""
        self._close()
