"""Builders of the embedded tiny models (autoround_exp/tiny/assets/)."""
