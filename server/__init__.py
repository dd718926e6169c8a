"""The disposition service."""
