"""
Tests for L{mailserver.sasl}: PLAIN, LOGIN and SCRAM-SHA-256, SCRAM checked byte for byte
against the exchange of RFC 7677 §3.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from twisted.trial.unittest import SynchronousTestCase

from mailserver.sasl import (
    MECHANISMS,
    SCRAM_ITERATIONS,
    Challenge,
    Failure,
    Login,
    Plain,
    ScramCredentials,
    ScramSHA256,
    Success,
    new_mechanism,
    saslprep,
    scram_credentials,
)

# RFC 7677 §3.
USER = "user"
PASSWORD = "pencil"
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
NONCE = CLIENT_NONCE + SERVER_NONCE
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def client_final(
    password: str,
    client_first_bare: str,
    server_first: str,
    gs2_header: str = "n,,",
) -> tuple[bytes, bytes]:
    """
    What a SCRAM-SHA-256 client answers to C{server_first}, and the server signature it then
    expects: an independent client, for the tests.
    """
    fields = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    binding = base64.b64encode(gs2_header.encode()).decode()
    without_proof = f"c={binding},r={fields['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    verifier = hmac.digest(server_key, auth_message, "sha256")
    return (
        f"{without_proof},p={base64.b64encode(proof).decode()}".encode(),
        b"v=" + base64.b64encode(verifier),
    )


class PlainTests(SynchronousTestCase):
    """L{Plain} (RFC 4616)."""

    def test_no_initial_response_gets_empty_challenge(self) -> None:
        self.assertEqual(Plain().respond(None), Challenge(b""))

    def test_user_and_password(self) -> None:
        """An empty authzid: the user and the password, for the caller to check."""
        self.assertEqual(
            Plain().respond(b"\x00alice@example.org\x00secret"),
            Success("alice@example.org", "secret"),
        )

    def test_authzid_equal_to_user(self) -> None:
        self.assertEqual(Plain().respond(b"alice\x00alice\x00pw"), Success("alice", "pw"))

    def test_other_authzid_refused(self) -> None:
        """Logging in as one user to act as another is refused (not a malformed message)."""
        step = Plain().respond(b"bob\x00alice\x00pw")
        self.assertIsInstance(step, Failure)
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "refused")

    def test_utf8(self) -> None:
        self.assertEqual(
            Plain().respond("\x00j\u00f6rg\x00p\u00e4ss".encode()),
            Success("j\u00f6rg", "p\u00e4ss"),
        )

    def test_malformed(self) -> None:
        """Wrong number of parts, an empty user, bad UTF-8: malformed."""
        for bad in (b"alice\x00pw", b"a\x00b\x00c\x00d", b"\x00\x00pw", b"\x00\xff\x00pw"):
            step = Plain().respond(bad)
            assert isinstance(step, Failure), bad
            self.assertEqual(step.kind, "malformed")

    def test_finished_exchange_takes_nothing_more(self) -> None:
        plain = Plain()
        plain.respond(b"\x00a\x00b")
        step = plain.respond(b"\x00a\x00b")
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "malformed")


class LoginTests(SynchronousTestCase):
    """L{Login}."""

    def test_exchange(self) -> None:
        login = Login()
        self.assertEqual(login.respond(None), Challenge(b"Username:"))
        self.assertEqual(login.respond(b"alice"), Challenge(b"Password:"))
        self.assertEqual(login.respond(b"secret"), Success("alice", "secret"))

    def test_initial_response_is_the_user(self) -> None:
        login = Login()
        self.assertEqual(login.respond(b"alice"), Challenge(b"Password:"))
        self.assertEqual(login.respond(b""), Success("alice", ""))

    def test_not_utf8(self) -> None:
        step = Login().respond(b"\xff")
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "malformed")


class ScramVectorTests(SynchronousTestCase):
    """SCRAM-SHA-256 against RFC 7677 §3."""

    def setUp(self) -> None:
        self.lookups: list[str] = []
        self.credentials = scram_credentials(PASSWORD, SALT, 4096)

    def lookup(self, username: str) -> ScramCredentials:
        self.lookups.append(username)
        return self.credentials

    def scram(self) -> ScramSHA256:
        return ScramSHA256(self.lookup, nonce_suffix=SERVER_NONCE)

    def test_credentials_of_the_vector(self) -> None:
        """The derived keys are those that make the vector's proof and signature."""
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", SALT, 4096)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        self.assertEqual(self.credentials.stored_key, hashlib.sha256(client_key).digest())
        self.assertEqual(self.credentials.iterations, 4096)

    def test_exact_exchange(self) -> None:
        """Every server message is the RFC's, and the success names the user."""
        scram = self.scram()
        self.assertEqual(scram.respond(None), Challenge(b""))
        self.assertEqual(scram.respond(CLIENT_FIRST), Challenge(SERVER_FIRST))
        self.assertEqual(self.lookups, [USER])
        self.assertEqual(scram.respond(CLIENT_FINAL), Success(USER, None, SERVER_FINAL))

    def test_wrong_proof(self) -> None:
        """A wrong proof is a credentials failure of that user (to count as a failed login)."""
        scram = self.scram()
        scram.respond(CLIENT_FIRST)
        proof = bytearray(base64.b64decode(CLIENT_FINAL.rpartition(b"p=")[2]))
        proof[0] ^= 1
        bad = CLIENT_FINAL.rpartition(b"p=")[0] + b"p=" + base64.b64encode(bytes(proof))
        step = scram.respond(bad)
        self.assertEqual(step, Failure("credentials", "wrong proof", USER))

    def test_wrong_password(self) -> None:
        """A client that knows another password fails."""
        scram = ScramSHA256(self.lookup)
        challenge = scram.respond(CLIENT_FIRST)
        assert isinstance(challenge, Challenge)
        final, _ = client_final("pencil2", "n=user,r=" + CLIENT_NONCE, challenge.data.decode())
        step = scram.respond(final)
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "credentials")

    def test_random_nonce_and_independent_client(self) -> None:
        """With its own random nonce the server takes a proof made by an independent client,
        and sends the signature the client expects."""
        scram = ScramSHA256(self.lookup)
        challenge = scram.respond(CLIENT_FIRST)
        assert isinstance(challenge, Challenge)
        server_first = challenge.data.decode()
        nonce = server_first.split(",")[0][2:]
        self.assertTrue(nonce.startswith(CLIENT_NONCE))
        self.assertGreater(len(nonce), len(CLIENT_NONCE) + 20)
        self.assertNotEqual(ScramSHA256(self.lookup).respond(CLIENT_FIRST), challenge)
        final, verifier = client_final(PASSWORD, "n=user,r=" + CLIENT_NONCE, server_first)
        self.assertEqual(scram.respond(final), Success(USER, None, verifier))

    def test_y_flag_accepted(self) -> None:
        """C{y,,}: the client could bind but thinks we cannot (right): accepted."""
        scram = ScramSHA256(self.lookup)
        challenge = scram.respond(b"y,,n=user,r=abc")
        assert isinstance(challenge, Challenge)
        final, verifier = client_final(PASSWORD, "n=user,r=abc", challenge.data.decode(), "y,,")
        self.assertEqual(scram.respond(final), Success(USER, None, verifier))

    def test_authzid_of_the_user_accepted(self) -> None:
        scram = ScramSHA256(self.lookup)
        challenge = scram.respond(b"n,a=user,n=user,r=abc")
        assert isinstance(challenge, Challenge)
        final, _ = client_final(PASSWORD, "n=user,r=abc", challenge.data.decode(), "n,a=user,")
        self.assertIsInstance(scram.respond(final), Success)

    def test_channel_binding_in_final_must_match_header(self) -> None:
        """A client that sends C{c=} for another GS2 header than its first message's fails."""
        scram = ScramSHA256(self.lookup)
        challenge = scram.respond(b"n,,n=user,r=abc")
        assert isinstance(challenge, Challenge)
        final, _ = client_final(PASSWORD, "n=user,r=abc", challenge.data.decode(), "y,,")
        step = scram.respond(final)
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "refused")

    def test_saslname_decoded(self) -> None:
        """C{=2C} and C{=3D} in the user name are a comma and an equals sign."""
        scram = ScramSHA256(self.lookup)
        scram.respond(b"n,,n=a=2Cb=3Dc,r=abc")
        self.assertEqual(self.lookups, ["a,b=c"])

    def test_utf8_user(self) -> None:
        ScramSHA256(self.lookup).respond("n,,n=j\u00f6rg,r=abc".encode())
        self.assertEqual(self.lookups, ["j\u00f6rg"])


class ScramRefusalTests(SynchronousTestCase):
    """What SCRAM-SHA-256 refuses, and how."""

    def lookup(self, username: str) -> ScramCredentials:
        return scram_credentials(PASSWORD, SALT)

    def first(self, message: bytes) -> Failure:
        step = ScramSHA256(self.lookup).respond(message)
        assert isinstance(step, Failure), step
        return step

    def test_channel_binding_refused(self) -> None:
        """C{p=} (channel binding) is refused: we offer no C{-PLUS} mechanism."""
        self.assertEqual(self.first(b"p=tls-unique,,n=user,r=abc").kind, "refused")
        self.assertEqual(self.first(b"p=tls-exporter,,n=user,r=abc").kind, "refused")

    def test_other_authzid_refused(self) -> None:
        self.assertEqual(self.first(b"n,a=admin,n=user,r=abc").kind, "refused")

    def test_mandatory_extension_refused(self) -> None:
        self.assertEqual(self.first(b"n,,m=ext,n=user,r=abc").kind, "refused")

    def test_malformed_first_messages(self) -> None:
        for bad in (
            b"",
            b"n,,",
            b"x,,n=user,r=abc",
            b"n,,r=abc,n=user",
            b"n,,n=user",
            b"n,,n=,r=abc",
            b"n,,n=user,r=",
            b"n,,n=us=2Xer,r=abc",
            b"n,,n=user,r=a\x01b",
            b"n,b=x,n=user,r=abc",
            b"n,,n=\xff,r=abc",
        ):
            self.assertEqual(self.first(bad).kind, "malformed", bad)

    def exchange(self) -> ScramSHA256:
        scram = ScramSHA256(self.lookup, nonce_suffix=SERVER_NONCE)
        scram.respond(CLIENT_FIRST)
        return scram

    def test_malformed_final_messages(self) -> None:
        proof = CLIENT_FINAL.rpartition(b",")[2]
        for bad in (
            b"c=biws,r=" + NONCE.encode(),
            b"r=" + NONCE.encode() + b",c=biws," + proof,
            b"c=biws," + proof,
            b"c=bi!s,r=" + NONCE.encode() + b"," + proof,
            b"c=biws,r=" + NONCE.encode() + b",p=AAAA",
            b"c=biws,r=" + NONCE.encode() + b",p=not base64",
        ):
            step = self.exchange().respond(bad)
            assert isinstance(step, Failure), bad
            self.assertEqual(step.kind, "malformed", bad)

    def test_nonce_mismatch(self) -> None:
        bad = CLIENT_FINAL.replace(b"k0,", b"k1,")
        step = self.exchange().respond(bad)
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "refused")

    def test_finished_exchange_takes_nothing_more(self) -> None:
        scram = self.exchange()
        self.assertIsInstance(scram.respond(CLIENT_FINAL), Success)
        step = scram.respond(CLIENT_FINAL)
        assert isinstance(step, Failure)
        self.assertEqual(step.kind, "malformed")

    def test_failure_ends_the_exchange(self) -> None:
        scram = ScramSHA256(self.lookup)
        scram.respond(b"nonsense")
        self.assertEqual(
            scram.respond(CLIENT_FIRST), Failure("malformed", "exchange already finished")
        )

    def test_bad_nonce_suffix(self) -> None:
        self.assertRaises(ValueError, ScramSHA256, self.lookup, "a,b")


class CredentialsTests(SynchronousTestCase):
    """L{scram_credentials} and L{saslprep}."""

    def test_defaults(self) -> None:
        """A new random salt of 16 octets each time, the RFC 7677 iteration count."""
        first = scram_credentials("secret")
        second = scram_credentials("secret")
        self.assertEqual(len(first.salt), 16)
        self.assertNotEqual(first.salt, second.salt)
        self.assertEqual(first.iterations, SCRAM_ITERATIONS)
        self.assertEqual(SCRAM_ITERATIONS, 4096)
        self.assertNotIn(b"secret", b"".join([first.salt, first.stored_key, first.server_key]))

    def test_saslprep(self) -> None:
        """RFC 4013 §3's examples that succeed, and mapping to nothing or to a space."""
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertEqual(saslprep("a\u00a0b"), "a b")

    def test_saslprep_refusals(self) -> None:
        """RFC 4013 §3's examples that fail: a control character, mixed bidirectional text."""
        self.assertRaises(ValueError, saslprep, "\u0007")
        self.assertRaises(ValueError, saslprep, "\u0627\u0031")

    def test_password_prepared(self) -> None:
        """Keys are derived from the SASLprep form: a client sending the NFKC form logs in."""
        self.assertEqual(scram_credentials("\u2168", SALT), scram_credentials("IX", SALT))

    def test_unpreparable_password_used_as_is(self) -> None:
        """A password SASLprep refuses still gets credentials, from its own octets."""
        credentials = scram_credentials("a\u0007b", SALT)
        salted = hashlib.pbkdf2_hmac("sha256", b"a\x07b", SALT, SCRAM_ITERATIONS)
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.assertEqual(credentials.server_key, server_key)


class NewMechanismTests(SynchronousTestCase):
    def test_names(self) -> None:
        """Names in any case; SCRAM only with a look-up; unknown names: None."""
        self.assertEqual(MECHANISMS, ("PLAIN", "LOGIN", "SCRAM-SHA-256"))
        self.assertIsInstance(new_mechanism("plain"), Plain)
        self.assertIsInstance(new_mechanism("Login"), Login)
        self.assertIsNone(new_mechanism("SCRAM-SHA-256"))
        self.assertIsInstance(
            new_mechanism("scram-sha-256", lambda name: scram_credentials("x")), ScramSHA256
        )
        self.assertIsNone(new_mechanism("CRAM-MD5"))
        self.assertIsNone(new_mechanism("SCRAM-SHA-256-PLUS", lambda name: scram_credentials("x")))
