"""Worker layer: attention over the paged KV cache."""
