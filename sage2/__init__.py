"""Placeholder: this generation lands in its own issue."""
