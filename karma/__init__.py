"""KARMA: shared contracts (config, errors, feature layout) and the `karma` command line.

`training`, `export` and `service` all import from here; nothing here imports torch, so the
service can depend on it without pulling the training stack in.
"""

__version__ = "0.1.0"
