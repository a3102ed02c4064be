"""Observation: Prometheus metrics and latency profiles of what is served."""
