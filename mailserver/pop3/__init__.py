"""POP3: the retrieval protocol (RFC 1939) over the mailbox store."""
