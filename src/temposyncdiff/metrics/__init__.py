"""``torchmetrics.Metric`` subclasses: lip sync (LSE-C/LSE-D), identity, temporal consistency, landmark mouth opening."""
