"""Lightning callbacks: EMA of the trainable net, weights export, sample videos, latency."""
