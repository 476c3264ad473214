# -*- test-case-name: tests.test_auth -*-
"""
Authentication of users for mail retrieval and submission (POP3, IMAP, SMTP AUTH).

L{Authenticator.authenticate} is what protocols call: it asks the L{AuthThrottle} whether the
client may try at all, logs in through a C{twisted.cred} L{Portal} whose checker verifies the
password against the directory (argon2id, in the I/O thread pool, never on the reactor thread),
and delays the reply to a failure. The avatar is the account's address (L{IAccount}).

SCRAM-SHA-256 (L{mailserver.sasl.ScramSHA256}) checks its proof itself, with the credentials
L{Authenticator.scram_credentials} looks up; L{Authenticator.scram_login} then counts the
outcome through the same throttle, with the same delays, errors and name rules as a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from mailserver import log
from mailserver.directory import DirectoryError, normalize_address
from mailserver.limits import AuthThrottle
from mailserver.sasl import ScramCredentials


class Throttled(Exception):
    """Too many failed logins from this client: try again later."""


class LoginFailed(Exception):
    """Wrong user name or password."""


class PasswordDirectory(Protocol):
    """What authentication needs of the directory (L{mailserver.directory.SQLiteDirectory})."""

    def verify_password(self, address: str, password: str | bytes) -> bool:
        """Blocking: whether C{password} is the password of account C{address}."""
        ...

    def scram_credentials(self, address: str) -> ScramCredentials:
        """
        A small read: the SCRAM-SHA-256 credentials of account C{address}, or a fake that is
        always the same for that name when it has none (no such account).
        """
        ...


class IAccount(Interface):
    """The avatar of a logged-in user: the account whose mail it may read."""

    address = Attribute("The account, as C{local@domain} in the directory's form.")


@implementer(IAccount)
@dataclass(frozen=True, slots=True)
class Account:
    address: str


def account_name(username: str, primary_domain: str) -> str:
    """
    The account a login name means: C{local@domain} in the directory's form; a bare local part
    (C{alice}) is an account of the primary domain.

    @raise DirectoryError: C{username} cannot name an account.
    """
    name = username.strip()
    if "@" not in name and primary_domain:
        name = f"{name}@{primary_domain}"
    return normalize_address(name)


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """
    Checks user names and passwords against the directory. The avatar id is the account's
    address (UTF-8); the user name must already be in the directory's form (L{account_name}).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        directory: PasswordDirectory,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        concurrency: int = 2,
    ) -> None:
        """
        @param concurrency: password checks running at once. Each argon2id check takes tens
            of milliseconds and 64 MiB; a bound keeps a burst of logins from taking every I/O
            thread (deliveries wait for those) and from multiplying that memory.
        """
        self._directory = directory
        self._reactor = reactor
        self._pool = pool
        self._slots = DeferredSemaphore(max(1, concurrency))

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """
        Verify C{credentials} (L{IUsernamePassword}) in the thread pool.

        @return: fires with the address, or fails with L{UnauthorizedLogin}.
        """
        creds = IUsernamePassword(credentials)
        username = creds.username
        password = creds.password
        d: Deferred[bool] = self._slots.run(
            deferToThreadPool,
            self._reactor,
            self._pool,
            self._directory.verify_password,
            username.decode("utf-8", "surrogatepass"),
            password,
        )

        def verdict(ok: bool) -> bytes | tuple[()]:
            if not ok:
                raise UnauthorizedLogin()
            return username

        return d.addCallback(verdict)


@implementer(IRealm)
class AccountRealm:
    """Gives the L{Account} for an avatar id from L{DirectoryChecker}."""

    def requestAvatar(
        self,
        avatarId: bytes | tuple[()],  # noqa: N803 (twisted.cred names it so)
        mind: object,
        *interfaces: type[Interface],
    ) -> tuple[type[Interface], object, Any]:
        if IAccount not in interfaces or not isinstance(avatarId, bytes):
            raise NotImplementedError("only IAccount avatars for named users")
        return IAccount, Account(avatarId.decode("utf-8", "surrogatepass")), _no_logout


def _no_logout() -> None:
    """An L{Account} holds nothing to let go of."""


class Authenticator:
    """
    Logs users in for the protocols: throttled per client, checked through C{twisted.cred} on
    the directory, failures answered late.
    """

    def __init__(
        self,
        directory: PasswordDirectory,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        throttle: AuthThrottle,
        primary_domain: str,
        *,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param reactor: runs the password checks' results back on the reactor thread; also the
            clock for the delays unless C{clock} is given.
        @param pool: the thread pool the checks run in.
        @param primary_domain: the domain of bare user names (C{alice}); C{""} for none, and
            then a bare name is no account.
        @param clock: the clock the failure delays wait on (default: C{reactor}).
        """
        self._clock = clock if clock is not None else IReactorTime(reactor)
        self._directory = directory
        self._throttle = throttle
        self._primary_domain = primary_domain.strip().lower()
        self.portal = Portal(AccountRealm(), [DirectoryChecker(directory, reactor, pool)])
        self._slots = DeferredSemaphore(2)

    def authenticate(self, peer_host: str, username: str, password: str) -> Deferred[str]:
        """
        Log C{username} in with C{password}, for a client at C{peer_host}.

        @return: fires with the account address (C{local@domain}); fails at once with
            L{Throttled} when the client has failed too often lately (no password is checked),
            or with L{LoginFailed} for an unknown user or a wrong password, after the
            throttle's delay.
        """
        return Deferred.fromCoroutine(self._authenticate(peer_host, username, password))

    async def _authenticate(self, peer_host: str, username: str, password: str) -> str:
        attempt = self._throttle.attempt(peer_host)
        if attempt is None:
            log.auth_throttled(peer_host, username)
            raise Throttled()
        try:
            # A bad name is checked all the same (the directory spends a dummy hash on it),
            # so that it takes as long as a wrong password.
            account = self._account(username)
            # surrogatepass never fails, and what it makes of a lone surrogate is not UTF-8,
            # so it can match no stored name or password.
            credentials = UsernamePassword(
                account.encode("utf-8", "surrogatepass"),
                password.encode("utf-8", "surrogatepass"),
            )
            await self._slots.acquire()
            try:
                # Asked again now that this check's turn has come: guesses sent in parallel
                # stop as soon as enough of the earlier ones have failed.
                if self._throttle.refused(peer_host):
                    attempt.abandon()
                    log.auth_throttled(peer_host, username)
                    raise Throttled()
                _, avatar, _ = await self.portal.login(credentials, None, IAccount)
            finally:
                self._slots.release()
        except UnauthorizedLogin:
            delay = attempt.failed(account)
            log.auth_failed(peer_host, username)
            if delay > 0:
                await deferLater(self._clock, delay)
            raise LoginFailed()
        except Throttled:
            raise
        except BaseException:
            attempt.abandon()
            raise
        attempt.succeeded(account)
        address: str = IAccount(avatar).address
        log.auth_succeeded(peer_host, address)
        return address

    def _account(self, username: str) -> str:
        """The account C{username} names (L{account_name}); for a name that cannot be one,
        the name itself, folded, which matches no account."""
        try:
            return account_name(username, self._primary_domain)
        except DirectoryError:
            return username.strip().lower()

    def scram_credentials(self, username: str) -> ScramCredentials:
        """
        The SCRAM-SHA-256 credentials of the account login name C{username} means (the rules
        of L{account_name}): what L{mailserver.sasl.ScramSHA256} is given as its C{lookup}.
        A name that is no account, or an account without SCRAM credentials, gets the
        directory's fake, always the same for that name: no proof matches it, and nothing
        tells it from a real one.
        """
        return self._directory.scram_credentials(self._account(username))

    def scram_login(self, peer_host: str, username: str, proof_ok: bool) -> Deferred[str]:
        """
        Count a finished SCRAM-SHA-256 exchange of C{username} from C{peer_host}, whose proof
        was right or wrong, as L{authenticate} counts a password.

        @return: fires with the account address; fails at once with L{Throttled} when the
            client has failed too often lately (whatever the proof: a throttled client learns
            nothing), or with L{LoginFailed} for a wrong proof, after the throttle's delay.
        """
        return Deferred.fromCoroutine(self._scram_login(peer_host, username, proof_ok))

    async def _scram_login(self, peer_host: str, username: str, proof_ok: bool) -> str:
        attempt = self._throttle.attempt(peer_host)
        if attempt is None:
            log.auth_throttled(peer_host, username)
            raise Throttled()
        account = self._account(username)
        if not proof_ok:
            delay = attempt.failed(account)
            log.auth_failed(peer_host, username)
            if delay > 0:
                await deferLater(self._clock, delay)
            raise LoginFailed()
        attempt.succeeded(account)
        log.auth_succeeded(peer_host, account)
        return account
