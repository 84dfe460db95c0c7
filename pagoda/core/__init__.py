"""Core layer: scheduling and KV-block bookkeeping in pure Python (never imports torch)."""
