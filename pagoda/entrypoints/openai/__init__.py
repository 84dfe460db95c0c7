"""Entrypoints layer: the OpenAI-compatible HTTP server (`pagoda serve`)."""
