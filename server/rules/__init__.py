"""Rules: pure checks of the domain, with no I/O and no state.

Field rules (validation), the catalog in force and what it allows (catalogs), and how API
secrets are made, hashed and compared (credentials). A rule appends violations or raises a
ServiceError (server.errors); it never reads a database, a clock it was not given, or a request.

May import: server.records, server.errors. Never: use cases, runtime, storage, server.db,
transport (servicers, interceptors, app, context) or grpc.
"""
