"""Target profiles shipped as TOML package data (see profile.py)."""
