"""Scenarios: one TOML file each (catalog.py reads them) and a runner module each; `djinn scenario` is cli.py."""
