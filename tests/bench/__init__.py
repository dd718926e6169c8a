"""`make bench`: load the real stack (gRPC server + Envoy) and print one JSON document."""
