"""Trainer callbacks and plots."""
