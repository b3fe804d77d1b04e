"""Sending results to Lightning loggers, and figures of them."""
