"""The rules of the service. Nothing here imports grpc or knows about protobuf."""
