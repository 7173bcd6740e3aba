"""The `fluxrig` command line; one module per command group (cmd_<name>.py)."""
