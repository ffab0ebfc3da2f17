"""Measures of generated replies and held-out loss."""
