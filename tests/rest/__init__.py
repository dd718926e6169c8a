"""REST layer: through a real Envoy (the REST contract, the gateway's envelope, OpenAPI, fuzzing,
the documentation's examples, native gRPC proxied by Envoy)."""
