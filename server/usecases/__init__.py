"""Use cases: one partner or operator action each, the service's API below the transport.

A use case takes the database and, when it acts for a partner, the caller explicitly
(`caller: Caller`, server/records.py: partner, tenant, sub-tenant, request id); it never reads
the request context. It validates with the rules, reads through storage, and writes through a
unit of work (or the runtime's group commit). `idempotency` is the protocol the write use cases
share; `access` is the authentication and grant check the interceptor runs for every RPC.

May import: server.rules, server.runtime, server.records, server.errors, server.storage,
server.db. Never: transport (servicers, interceptors, app, context) or grpc.
"""
