"""Unit layer: pure logic and in-process components (a database file at most); no server process,
no Envoy. `make test-fast` runs it in seconds."""
