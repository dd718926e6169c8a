"""What runs in or next to Envoy: the envelope filter, the config renderer, the launcher."""
