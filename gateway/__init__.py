"""What runs in or beside Envoy: the envelope filter (envelope.lua) and its error vocabulary
(vocabulary.py), the config renderer (envoy_config.py) and the OpenAPI build (openapi.py).

It may import server.errors (the vocabulary) and the generated descriptors; nothing starts
processes here (that is devstack/)."""
