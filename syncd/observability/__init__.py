"""Metrics, logs and the HTTP endpoints (/metrics /livez /readyz)."""
