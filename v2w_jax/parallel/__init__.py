"""Device mesh, logical-axis rules and multi-process start-up. The only place that names mesh axes."""
