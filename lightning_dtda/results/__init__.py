"""What attribution and retraining produce: results, ground truths, and statistics over seeds."""
