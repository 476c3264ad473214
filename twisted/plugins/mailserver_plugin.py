"""twistd plugin: C{twistd mailserver [--config PATH]}."""

from twisted.application.service import ServiceMaker

mailserver = ServiceMaker(
    "mailserver", "mailserver.tap", "SMTP, submission, POP3 and IMAP mail server", "mailserver"
)
