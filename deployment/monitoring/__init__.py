"""Fleet monitoring files: Prometheus configs, alert rules, Alertmanager, the Grafana dashboard."""
