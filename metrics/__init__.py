"""torchmetrics.Metric classes with pure-function cores."""
