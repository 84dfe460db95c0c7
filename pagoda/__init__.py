"""Pagoda: a readable LLM inference engine with vLLM v1's architecture."""
