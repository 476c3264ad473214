"""IMAP4rev1/IMAP4rev2 server: parser, selected-mailbox view, protocol."""
