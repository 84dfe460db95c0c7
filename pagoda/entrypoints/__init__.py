"""Entrypoints layer: the offline `LLM` API and the `pagoda` command line."""
