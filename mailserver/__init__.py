"""mailserver: the whole mail system of a small organisation, on Twisted."""

__version__ = "0.1.0"
