"""Storage functions: keyword-only arguments, Core statements, never commit on their own.

The unit of work (`Database.write()` / `Database.read()`) is owned by the caller.
"""
