"""What each task trains and measures: metrics and evaluation."""
