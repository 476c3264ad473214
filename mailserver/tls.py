# -*- test-case-name: tests.test_tls -*-
"""
TLS material and server contexts.

L{ensure_self_signed} makes (once) a self-signed certificate for servers configured without
one. L{ServerTLS} holds the current server context built from a PEM certificate chain and a
PEM private key, and can L{reload <ServerTLS.reload>} them: it is itself the connection creator
given to C{ITLSTransport.startTLS} (STARTTLS) and to C{TLSMemoryBIOFactory} (implicit TLS), and
it always hands out the I{current} context, so new connections get a renewed certificate
without restarting listeners. L{server_tls_from_config} picks between the two from the
configuration.

Contexts accept TLS 1.2 and newer only, let the server choose the cipher, disable TLS
compression and session tickets, and release idle connections' buffers
(C{SSL_MODE_RELEASE_BUFFERS}), which matters with thousands of idle TLS connections.

Everything here does blocking file I/O; callers that care run it off the reactor thread.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailserver.config import ServerConfig, TLSConfig
from mailserver.store.durable import atomic_write

CERT_FILE = "cert.pem"
"""Name of the self-signed certificate in the TLS directory."""
KEY_FILE = "key.pem"
"""Name of the self-signed certificate's private key in the TLS directory."""
SELF_SIGNED_VALIDITY = timedelta(days=3650)
"""How long a generated self-signed certificate is valid."""

_CN_MAX = 64  # RFC 5280 ub-common-name


class TLSError(Exception):
    """
    TLS material could not be loaded: a file is missing or unreadable, is not PEM, holds no
    certificate or no usable key, or the key does not belong to the certificate. The message
    names the file.
    """


# --- self-signed certificate ---------------------------------------------------------------


def ensure_self_signed(tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    """
    Return a self-signed certificate and its key under C{tls_dir}, making them if needed.

    If C{tls_dir/cert.pem} and C{tls_dir/key.pem} both exist they are returned as they are
    (not even read). Otherwise C{tls_dir} is created (mode 0700), an ECDSA P-256 key and a
    certificate naming C{hostname} (CN and subjectAltName, plus C{localhost}, C{127.0.0.1} and
    C{::1}; valid L{SELF_SIGNED_VALIDITY}) are generated, and both are written atomically: the
    key first (mode 0600), then the certificate. A crash part way leaves at worst a key without
    a certificate, which the next call replaces.

    @param tls_dir: directory holding C{cert.pem} and C{key.pem}.
    @param hostname: the server's name, as used in its greeting.
    @return: C{(cert_path, key_path)}.
    @raise OSError: the directory or files cannot be created.
    """
    cert_path = tls_dir / CERT_FILE
    key_path = tls_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if not tls_dir.is_dir():
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(tls_dir, 0o700)  # mkdir's mode is filtered by the umask
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed_certificate(key, hostname)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(key_path, key_pem, 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey, hostname: str) -> x509.Certificate:
    """
    A self-signed server certificate for C{hostname} (also valid for localhost and loopback).
    """
    name = _ascii_hostname(hostname)
    sans: list[x509.GeneralName] = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(name)))
    except ValueError:
        if name:
            sans.append(x509.DNSName(name))
    for extra in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ):
        if extra not in sans:
            sans.append(extra)
    cn = name if 0 < len(name) <= _CN_MAX else "localhost"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))  # tolerate clients whose clock is behind
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _ascii_hostname(hostname: str) -> str:
    """
    C{hostname} as certificates spell it: lower case, no trailing dot, IDNA A-labels.
    """
    name = hostname.strip().rstrip(".").lower()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


# --- server contexts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Loaded:
    """
    One generation of TLS material: the options, their (already built) context, the chain.
    """

    options: CertificateOptions
    context: SSL.Context
    chain: tuple[x509.Certificate, ...]


_SERVER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSError(f"{path}: cannot read the {what}: {e.strerror or e}") from e


def _load(cert_path: Path, key_path: Path) -> _Loaded:
    """
    Read a PEM chain (leaf first, then intermediates) and a PEM key and build a server context.

    @raise TLSError: naming the file at fault.
    """
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "private key")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_data))
    except ValueError as e:
        raise TLSError(f"{cert_path}: not a PEM certificate chain: {e}") from e
    if not chain:  # pragma: no cover - cryptography raises ValueError for no certificate
        raise TLSError(f"{cert_path}: holds no certificate")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as e:  # encrypted key
        raise TLSError(f"{key_path}: the private key must not be encrypted ({e})") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSError(f"{key_path}: not a usable PEM private key: {e}") from e
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise TLSError(
            f"{key_path}: a {type(key).__name__} cannot serve TLS; use an RSA, ECDSA or EdDSA key"
        )

    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    leaf = chain[0]
    try:
        leaf_public = leaf.public_key().public_bytes(der, spki)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSError(f"{cert_path}: unusable public key in the certificate: {e}") from e
    if key.public_key().public_bytes(der, spki) != leaf_public:
        raise TLSError(
            f"{key_path}: the private key does not match the certificate in {cert_path}"
            " (the first certificate of the file must be the server's own)"
        )

    try:
        # No certificate here: CertificateOptions would hand pyOpenSSL X509/PKey objects, which
        # it deprecates; the context takes cryptography's objects directly, below.
        options = CertificateOptions(
            raiseMinimumTo=TLSVersion.TLSv1_2,
            enableSessionTickets=False,
        )
        # Build the context now (CertificateOptions caches it and makes every connection from
        # it), so that errors surface here rather than on the first connection, and while it
        # can still be configured: pyOpenSSL refuses changes once a connection was made from it.
        context = options.getContext()
        context.use_certificate(leaf)
        context.use_privatekey(key)
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.check_privatekey()
        # CertificateOptions already sets these; say so explicitly rather than depend on it.
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSError(f"{cert_path}, {key_path}: cannot make a TLS context: {e}") from e
    return _Loaded(options=options, context=context, chain=chain)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS configuration from a certificate chain file and a key file, reloadable.

    An instance is the connection creator for both STARTTLS (C{transport.startTLS(tls)}) and
    implicit TLS (C{TLSMemoryBIOFactory(tls, False, factory)}): each new connection uses the
    context current at that moment, so after L{reload} new connections present the new
    certificate while established ones keep theirs.

    @ivar cert_path: the PEM file: the server's certificate, then any intermediates.
    @ivar key_path: the PEM private key (unencrypted) of the first certificate.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        """
        Load C{cert} and C{key}.

        @raise TLSError: a file is missing or invalid, or the key does not match.
        """
        self.cert_path = cert
        self.key_path = key
        self._current = _load(cert, key)

    def __repr__(self) -> str:
        return f"<ServerTLS cert={str(self.cert_path)!r} key={str(self.key_path)!r}>"

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """
        The current certificate chain: the server's certificate first.
        """
        return self._current.chain

    @property
    def certificate(self) -> x509.Certificate:
        """
        The server's current certificate (for logging its subject, fingerprint, expiry).
        """
        return self._current.chain[0]

    def reload(self) -> None:
        """
        Read the files again and use them for new connections.

        The new context replaces the old in a single assignment, so this may run in a thread
        other than the reactor's. On failure the current context stays in use.

        @raise TLSError: the files are now missing or invalid; nothing changed.
        """
        self._current = _load(self.cert_path, self.key_path)

    def context_factory(self) -> ServerTLS:
        """
        The object to pass to C{startTLS} or C{TLSMemoryBIOFactory}: this instance, which
        provides C{IOpenSSLServerConnectionCreator} (and the older C{IOpenSSLContextFactory})
        and always uses the current context.
        """
        return self

    def getContext(self) -> SSL.Context:
        """
        The current context (L{IOpenSSLContextFactory}). It must not be modified: connections
        may already have been made from it.
        """
        return self._current.context

    def serverConnectionForTLS(
        self,
        tlsProtocol: TLSMemoryBIOProtocol,  # noqa: N803 - the interface's name
    ) -> SSL.Connection:
        """
        A new server connection from the current context (L{IOpenSSLServerConnectionCreator}).
        """
        return self._current.options.serverConnectionForTLS(tlsProtocol)


def server_tls_from_config(tls: TLSConfig, server: ServerConfig) -> ServerTLS:
    """
    The server's TLS from the configuration: the configured certificate and key if given,
    otherwise a self-signed certificate under C{data_dir/tls} (made on first use).

    @raise TLSError: the configured files are missing or invalid.
    @raise OSError: the self-signed certificate cannot be written.
    """
    if tls.cert is not None and tls.key is not None:
        return ServerTLS(tls.cert, tls.key)
    cert, key = ensure_self_signed(server.data_dir / "tls", server.hostname)
    return ServerTLS(cert, key)
