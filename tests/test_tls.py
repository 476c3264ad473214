"""
Tests for L{mailserver.tls}: self-signed material, loading and reloading server contexts, and
real TLS handshakes over loopback with the standard library's C{ssl} client.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import stat
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorThreads,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from mailserver.config import ServerConfig, TLSConfig
from mailserver.tls import ServerTLS, TLSError, ensure_self_signed, server_tls_from_config

HOSTNAME = "mail.example.test"
TIMEOUT = 10.0
"""Seconds any socket operation or wait in these tests may take."""

_T = TypeVar("_T")


# --- helpers -------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    ca: bool,
    dns: tuple[str, ...] = (),
) -> x509.Certificate:
    """A certificate for C{subject}'s C{key}, signed by C{issuer_key}."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der(path: Path) -> bytes:
    """The DER bytes of the first certificate in the PEM file at C{path}."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def _client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A stdlib client context that does not verify the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        with warnings.catch_warnings():  # the old versions are deprecated, which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = maximum
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def _echo_over_tls(tls: ssl.SSLSocket) -> bytes:
    """Send a line through C{tls} and read back the echo (bounded)."""
    tls.sendall(b"ping\r\n")
    data = b""
    for _ in range(100):
        if data.endswith(b"\r\n"):
            break
        chunk = tls.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


class _Handshake:
    """What the stdlib client saw of a TLS connection."""

    def __init__(self, version: str | None, peer_der: bytes | None, echoed: bytes) -> None:
        self.version = version
        self.peer_der = peer_der
        self.echoed = echoed


def _connect(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None) -> _Handshake:
    """
    Blocking (run in a thread): connect to 127.0.0.1:C{port}, handshake, echo a line.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
            echoed = _echo_over_tls(tls)
            return _Handshake(tls.version(), tls.getpeercert(binary_form=True), echoed)


def _connect_starttls(port: int, ctx: ssl.SSLContext) -> _Handshake:
    """
    Blocking (run in a thread): connect in clear text, ask for STARTTLS, then as L{_connect}.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"STARTTLS\r\n")
        reply = b""
        for _ in range(100):
            if reply.endswith(b"\r\n"):
                break
            chunk = sock.recv(1)  # one octet at a time: nothing after the line may be eaten
            if not chunk:
                break
            reply += chunk
        if reply != b"220 go ahead\r\n":
            raise AssertionError(f"unexpected STARTTLS reply {reply!r}")
        with ctx.wrap_socket(sock) as tls:
            echoed = _echo_over_tls(tls)
            return _Handshake(tls.version(), tls.getpeercert(binary_form=True), echoed)


def _failing_connect(port: int, ctx: ssl.SSLContext) -> BaseException | None:
    """Blocking (run in a thread): like L{_connect}, returning the error rather than raising."""
    try:
        _connect(port, ctx)
    except (ssl.SSLError, OSError) as e:
        return e
    return None


def _in_thread(fn: Callable[[], _T]) -> Deferred[_T]:
    """Run the blocking C{fn} in the reactor's thread pool."""
    threads = IReactorThreads(reactor)
    return deferToThreadPool(threads, threads.getThreadPool(), fn)


class _Echo(Protocol):
    def __init__(self, lost: Deferred[None]) -> None:
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class _StartTLSEcho(LineReceiver):
    """Clear-text line protocol: C{STARTTLS} switches to TLS, then every line is echoed."""

    def __init__(self, lost: Deferred[None], tls: ServerTLS) -> None:
        self.lost = lost
        self.tls = tls
        self.secure = False

    def lineReceived(self, line: bytes) -> None:
        if not self.secure and line == b"STARTTLS":
            self.sendLine(b"220 go ahead")
            transport = ITLSTransport(self.transport)
            transport.startTLS(self.tls.context_factory())
            self.secure = True
        elif self.secure:
            self.sendLine(line)
        else:
            self.sendLine(b"530 must issue STARTTLS first")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class _Tracking(Factory):
    """A factory whose connections' ends can be awaited, so no test leaves a socket behind."""

    def __init__(self, make: Callable[[Deferred[None]], Protocol]) -> None:
        self.make = make
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> Protocol:
        d: Deferred[None] = Deferred()
        self.lost.append(d)
        p = self.make(d)
        p.factory = self
        return p

    def all_closed(self) -> Deferred[None]:
        d = gatherResults(list(self.lost)).addCallback(lambda _: None)
        return d.addTimeout(TIMEOUT, reactor)


# --- tests ---------------------------------------------------------------------------------


class SelfSignedTests(TestCase):
    """L{ensure_self_signed}."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.tls_dir = self.base / "data" / "tls"

    def test_creates_files_with_private_modes(self) -> None:
        """
        The directory is made with mode 0700, the key is written with mode 0600, the
        certificate is readable, and no temporary file is left behind.
        """
        cert, key = ensure_self_signed(self.tls_dir, HOSTNAME)
        self.assertEqual((cert, key), (self.tls_dir / "cert.pem", self.tls_dir / "key.pem"))
        self.assertEqual(stat.S_IMODE(os.stat(self.tls_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(cert).st_mode), 0o644)
        self.assertEqual(sorted(os.listdir(self.tls_dir)), ["cert.pem", "key.pem"])

    def test_idempotent(self) -> None:
        """
        A second call returns the same files without regenerating them: the bytes are equal.
        """
        cert, key = ensure_self_signed(self.tls_dir, HOSTNAME)
        before = (cert.read_bytes(), key.read_bytes())
        again = ensure_self_signed(self.tls_dir, HOSTNAME)
        self.assertEqual(again, (cert, key))
        self.assertEqual((cert.read_bytes(), key.read_bytes()), before)

    def test_names_hostname(self) -> None:
        """
        The certificate is self-signed for the hostname (CN and subjectAltName), also names
        localhost, 127.0.0.1 and ::1, is not a CA, and is valid for about ten years.
        """
        cert_path, key_path = ensure_self_signed(self.tls_dir, HOSTNAME)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, HOSTNAME
        )
        self.assertEqual(cert.issuer, cert.subject)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [HOSTNAME, "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        lifetime = cert.not_valid_after_utc - datetime.now(UTC)
        self.assertTrue(timedelta(days=3640) < lifetime <= timedelta(days=3650))
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        cert.verify_directly_issued_by(cert)  # signed by its own key

    def test_long_hostname(self) -> None:
        """
        A hostname longer than a common name may be (64) is still in the subjectAltName.
        """
        long_name = ("a" * 60) + ".example.test"
        cert_path, _ = ensure_self_signed(self.tls_dir, long_name)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(long_name, san.get_values_for_type(x509.DNSName))

    def test_regenerates_when_half_missing(self) -> None:
        """
        A key without its certificate (a crash between the two writes) is replaced by a new
        pair that belongs together.
        """
        cert, key = ensure_self_signed(self.tls_dir, HOSTNAME)
        old_key = key.read_bytes()
        cert.unlink()
        ensure_self_signed(self.tls_dir, HOSTNAME)
        self.assertTrue(cert.exists())
        self.assertNotEqual(key.read_bytes(), old_key)
        ServerTLS(cert, key)  # the key matches the certificate


class ServerTLSLoadTests(TestCase):
    """Loading L{ServerTLS} and refusing bad material."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.cert, self.key = ensure_self_signed(base / "a", HOSTNAME)
        self.other_cert, self.other_key = ensure_self_signed(base / "b", HOSTNAME)

    def test_loads(self) -> None:
        """
        A matching pair loads; the current certificate is the file's.
        """
        tls = ServerTLS(self.cert, self.key)
        self.assertEqual(tls.certificate.public_bytes(serialization.Encoding.DER), _der(self.cert))
        self.assertEqual(len(tls.chain), 1)

    def test_mismatched_key(self) -> None:
        """
        A key that does not belong to the certificate is refused, naming the key file.
        """
        e = self.assertRaises(TLSError, ServerTLS, self.cert, self.other_key)
        self.assertIn(str(self.other_key), str(e))
        self.assertIn("does not match", str(e))

    def test_missing_cert(self) -> None:
        """
        A missing certificate file is refused, naming the file.
        """
        missing = self.cert.parent / "nope.pem"
        e = self.assertRaises(TLSError, ServerTLS, missing, self.key)
        self.assertIn(str(missing), str(e))

    def test_missing_key(self) -> None:
        """
        A missing key file is refused, naming the file.
        """
        missing = self.key.parent / "nope.pem"
        e = self.assertRaises(TLSError, ServerTLS, self.cert, missing)
        self.assertIn(str(missing), str(e))

    def test_not_pem(self) -> None:
        """
        A certificate file without a PEM certificate, or a key file without a PEM key, is
        refused, naming the file.
        """
        garbage = self.cert.parent / "garbage.pem"
        garbage.write_bytes(b"this is not PEM\n")
        e = self.assertRaises(TLSError, ServerTLS, garbage, self.key)
        self.assertIn(str(garbage), str(e))
        e = self.assertRaises(TLSError, ServerTLS, self.cert, garbage)
        self.assertIn(str(garbage), str(e))
        # a key file holding a certificate
        e = self.assertRaises(TLSError, ServerTLS, self.cert, self.cert)
        self.assertIn(str(self.cert), str(e))

    def test_encrypted_key(self) -> None:
        """
        A passphrase-protected key is refused (there is nobody to type the passphrase).
        """
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        encrypted = self.key.parent / "encrypted.pem"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        e = self.assertRaises(TLSError, ServerTLS, self.cert, encrypted)
        self.assertIn(str(encrypted), str(e))
        self.assertIn("encrypted", str(e))

    def test_context_options(self) -> None:
        """
        The context refuses TLS < 1.2 and compression, prefers the server's cipher order and
        releases idle buffers (C{SSL_MODE_RELEASE_BUFFERS}).
        """
        ctx = ServerTLS(self.cert, self.key).getContext()
        # On a context no connection was made from, adding nothing returns the current bits.
        options = ctx.set_options(0)
        for flag in (
            SSL.OP_NO_SSLv3,
            SSL.OP_NO_TLSv1,
            SSL.OP_NO_TLSv1_1,
            SSL.OP_NO_COMPRESSION,
            SSL.OP_CIPHER_SERVER_PREFERENCE,
        ):
            self.assertEqual(options & flag, flag, hex(flag))
        self.assertEqual(options & SSL.OP_NO_TLSv1_2, 0)
        self.assertEqual(ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS, SSL.MODE_RELEASE_BUFFERS)

    def test_connection_creator(self) -> None:
        """
        L{ServerTLS.context_factory} provides C{IOpenSSLServerConnectionCreator}.
        """
        tls = ServerTLS(self.cert, self.key)
        factory = tls.context_factory()
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, factory))

    def test_reload_bad_keeps_old(self) -> None:
        """
        When the files have become bad, L{ServerTLS.reload} raises L{TLSError} and the old
        context and certificate stay in use.
        """
        tls = ServerTLS(self.cert, self.key)
        ctx, cert = tls.getContext(), tls.certificate
        shutil.copyfile(self.other_key, self.key)
        self.assertRaises(TLSError, tls.reload)
        self.key.unlink()
        self.assertRaises(TLSError, tls.reload)
        self.assertIs(tls.getContext(), ctx)
        self.assertEqual(tls.certificate, cert)

    def test_reload_good(self) -> None:
        """
        L{ServerTLS.reload} picks up new files: a new context and the new certificate.
        """
        tls = ServerTLS(self.cert, self.key)
        ctx = tls.getContext()
        shutil.copyfile(self.other_cert, self.cert)
        shutil.copyfile(self.other_key, self.key)
        tls.reload()
        self.assertIsNot(tls.getContext(), ctx)
        self.assertEqual(
            tls.certificate.public_bytes(serialization.Encoding.DER), _der(self.other_cert)
        )


class FromConfigTests(TestCase):
    """L{server_tls_from_config}."""

    def test_configured(self) -> None:
        """
        With C{cert} and C{key} configured, those files are used and nothing is generated.
        """
        base = Path(self.mktemp())
        cert, key = ensure_self_signed(base / "own", HOSTNAME)
        data_dir = base / "data"
        tls = server_tls_from_config(
            TLSConfig(cert=cert, key=key), ServerConfig(hostname=HOSTNAME, data_dir=data_dir)
        )
        self.assertEqual((tls.cert_path, tls.key_path), (cert, key))
        self.assertFalse(data_dir.exists())

    def test_self_signed(self) -> None:
        """
        Without C{cert} and C{key}, a self-signed certificate for the configured hostname is
        made under C{data_dir/tls}.
        """
        data_dir = Path(self.mktemp())
        tls = server_tls_from_config(
            TLSConfig(), ServerConfig(hostname="mx.example.test", data_dir=data_dir)
        )
        self.assertEqual(tls.cert_path, data_dir / "tls" / "cert.pem")
        self.assertEqual(tls.key_path, data_dir / "tls" / "key.pem")
        san = tls.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertIn("mx.example.test", san.value.get_values_for_type(x509.DNSName))

    def test_configured_missing(self) -> None:
        """
        Configured files that do not exist are an error, not a reason to make a self-signed one.
        """
        base = Path(self.mktemp())
        self.assertRaises(
            TLSError,
            server_tls_from_config,
            TLSConfig(cert=base / "cert.pem", key=base / "key.pem"),
            ServerConfig(hostname=HOSTNAME, data_dir=base / "data"),
        )
        self.assertFalse((base / "data").exists())


class HandshakeTests(TestCase):
    """Real TLS connections over loopback, the client being the standard library's C{ssl}."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.cert, self.key = ensure_self_signed(self.base / "tls", HOSTNAME)
        self.tls = ServerTLS(self.cert, self.key)

    async def _listen(self, wrap: Callable[[_Tracking], IProtocolFactory]) -> int:
        """
        Listen on 127.0.0.1 (a free port) with C{wrap(echo_factory)}; the test's clean-up waits
        for its connections to end and stops listening.
        """
        echo = _Tracking(_Echo)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port: IListeningPort = await endpoint.listen(wrap(echo))
        self.addCleanup(port.stopListening)
        self.addCleanup(echo.all_closed)
        host = port.getHost()
        assert isinstance(host, IPv4Address)
        return host.port

    async def _listen_implicit(self) -> int:
        return await self._listen(lambda echo: TLSMemoryBIOFactory(self.tls, False, echo))

    async def test_implicit_tls(self) -> None:
        """
        Implicit TLS through C{TLSMemoryBIOFactory}: the handshake succeeds with TLS 1.2 or
        newer, the server presents its certificate, and data flows both ways.
        """
        port = await self._listen_implicit()
        seen = await _in_thread(lambda: _connect(port, _client_context()))
        self.assertIn(seen.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(seen.peer_der, _der(self.cert))
        self.assertEqual(seen.echoed, b"ping\r\n")

    async def test_tls12_client(self) -> None:
        """
        A client that speaks at most TLS 1.2 is served with TLS 1.2.
        """
        port = await self._listen_implicit()
        ctx = _client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        seen = await _in_thread(lambda: _connect(port, ctx))
        self.assertEqual(seen.version, "TLSv1.2")
        self.assertEqual(seen.echoed, b"ping\r\n")

    async def test_self_signed_verifies(self) -> None:
        """
        A client that trusts the self-signed certificate accepts it for the hostname, for
        localhost and for 127.0.0.1, with hostname checking on.
        """
        port = await self._listen_implicit()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.cert))
        for name in (HOSTNAME, "localhost", "127.0.0.1"):
            seen = await _in_thread(partial(_connect, port, ctx, name))
            self.assertEqual(seen.echoed, b"ping\r\n", name)

    async def test_starttls(self) -> None:
        """
        The same object serves C{ITLSTransport.startTLS} (STARTTLS) on a clear-text connection.
        """
        port = await self._listen(lambda _: _Tracking(lambda d: _StartTLSEcho(d, self.tls)))
        seen = await _in_thread(lambda: _connect_starttls(port, _client_context()))
        self.assertIn(seen.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(seen.peer_der, _der(self.cert))
        self.assertEqual(seen.echoed, b"ping\r\n")

    async def test_tls11_client_refused(self) -> None:
        """
        A client that speaks at most TLS 1.1 cannot complete a handshake.
        """
        reason = _tls11_unavailable(self.cert, self.key)
        if reason is not None:
            raise SkipTest(reason)
        port = await self._listen_implicit()
        error = await _in_thread(
            lambda: _failing_connect(port, _client_context(ssl.TLSVersion.TLSv1_1))
        )
        self.assertIsInstance(error, ssl.SSLError | ConnectionError)
        self.assertNotIn("NO_PROTOCOLS_AVAILABLE", str(error))

    async def test_chain(self) -> None:
        """
        The intermediates after the server's certificate in the file are sent: a client that
        trusts only the root verifies the chain root -> intermediate -> server.
        """
        root_key = ec.generate_private_key(ec.SECP256R1())
        inter_key = ec.generate_private_key(ec.SECP256R1())
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        root = _certificate("Test Root", root_key, "Test Root", root_key, ca=True)
        inter = _certificate("Test Intermediate", inter_key, "Test Root", root_key, ca=True)
        leaf = _certificate(
            HOSTNAME, leaf_key, "Test Intermediate", inter_key, ca=False, dns=(HOSTNAME,)
        )
        chain_dir = self.base / "chain"
        chain_dir.mkdir()
        cert, key, root_file = (chain_dir / n for n in ("cert.pem", "key.pem", "root.pem"))
        cert.write_bytes(_pem(leaf) + _pem(inter))
        key.write_bytes(_key_pem(leaf_key))
        root_file.write_bytes(_pem(root))
        self.tls = ServerTLS(cert, key)
        self.assertEqual(len(self.tls.chain), 2)

        port = await self._listen_implicit()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(root_file))
        seen = await _in_thread(lambda: _connect(port, ctx, HOSTNAME))
        self.assertEqual(seen.peer_der, leaf.public_bytes(serialization.Encoding.DER))
        self.assertEqual(seen.echoed, b"ping\r\n")

    async def test_rsa_key(self) -> None:
        """
        An RSA key and certificate work as well as ECDSA.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _certificate(HOSTNAME, key, HOSTNAME, key, ca=False, dns=(HOSTNAME,))
        rsa_dir = self.base / "rsa"
        rsa_dir.mkdir()
        (rsa_dir / "cert.pem").write_bytes(_pem(cert))
        (rsa_dir / "key.pem").write_bytes(_key_pem(key))
        self.tls = ServerTLS(rsa_dir / "cert.pem", rsa_dir / "key.pem")
        port = await self._listen_implicit()
        seen = await _in_thread(lambda: _connect(port, _client_context()))
        self.assertEqual(seen.peer_der, cert.public_bytes(serialization.Encoding.DER))

    async def test_reload(self) -> None:
        """
        After new files are written and L{ServerTLS.reload} called, a new connection to the
        same, still-listening port gets the new certificate; a failed reload afterwards keeps
        serving the new one.
        """
        port = await self._listen_implicit()
        first = await _in_thread(lambda: _connect(port, _client_context()))
        self.assertEqual(first.peer_der, _der(self.cert))

        new_cert, new_key = ensure_self_signed(self.base / "new", HOSTNAME)
        self.assertNotEqual(_der(new_cert), _der(self.cert))
        shutil.copyfile(new_key, self.key)
        shutil.copyfile(new_cert, self.cert)
        self.tls.reload()
        second = await _in_thread(lambda: _connect(port, _client_context()))
        self.assertEqual(second.peer_der, _der(new_cert))
        self.assertEqual(second.echoed, b"ping\r\n")

        self.cert.write_bytes(b"broken\n")
        self.assertRaises(TLSError, self.tls.reload)
        third = await _in_thread(lambda: _connect(port, _client_context()))
        self.assertEqual(third.peer_der, _der(new_cert))


def _tls11_unavailable(cert: Path, key: Path) -> str | None:
    """
    Why the local OpenSSL cannot speak TLS 1.1 even when asked to, or None if it can: an
    in-memory handshake between two stdlib contexts limited to TLS 1.1 (no sockets).
    """
    if not ssl.HAS_TLSv1_1:
        return "this OpenSSL was built without TLS 1.1"
    try:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1
            server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        server_ctx.set_ciphers("ALL:@SECLEVEL=0")
        server_ctx.load_cert_chain(str(cert), str(key))
        client_ctx = _client_context(ssl.TLSVersion.TLSv1_1)
    except (ssl.SSLError, ValueError) as e:
        return f"cannot configure TLS 1.1 locally: {e}"
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1])
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, side in enumerate((client, server)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError as e:
                    return f"the local OpenSSL refuses TLS 1.1: {e}"
        bios[2].write(bios[1].read())  # client -> server
        bios[0].write(bios[3].read())  # server -> client
        if all(done):
            return None if client.version() == "TLSv1.1" else "TLS 1.1 was not negotiated"
    return "TLS 1.1 handshake did not finish"
