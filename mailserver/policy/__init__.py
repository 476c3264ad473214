"""Policy: decisions returned as verdicts; the protocol layers phrase the replies."""
