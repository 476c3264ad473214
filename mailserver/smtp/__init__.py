"""SMTP: the wire protocol (server), its I/O-free vocabulary (codes, addresses, DATA framing)."""
