"""
The outbound queue (DESIGN.md §3/§4): durable entries (L{spool}), the retry schedule
(L{scheduler}), delivery to the next hop (L{delivery}) and delivery status notifications
(L{dsn}). The shared vocabulary is in L{model}.
"""
