"""Argument parsers and thin command functions of the CLI, one module per group of stages."""
