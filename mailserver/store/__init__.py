"""Mail storage: durable maildir delivery and its in-memory twin."""
