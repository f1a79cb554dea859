"""Prometheus metrics and logging."""
