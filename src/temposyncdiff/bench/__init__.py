"""tsd-bench's measurements: ``generation`` (latency of the generation path), ``report`` (tables and plot of it),
``prepare`` (tsd-data prepare's peak memory vs video length)."""
