"""Runtime machinery: long-lived, in-process state that serves many requests.

The change feed hub (feed), the credential and grant cache (access_cache), the rate limiters
(ratelimit) and the group commit of single updates (update_groups). App builds, starts and
closes the first three; the group commit queue is made per Database on first use. Each takes
what it needs of a request as arguments, never from the request context.

May import: server.rules, server.records, server.errors, server.storage, server.db. Never: use
cases, transport (servicers, interceptors, app, context) or grpc.
"""
