"""KV connector layer: the engine's only door to the tiered KV store (`pagoda.kvstore`).

The scheduler side (`scheduler_side`, no torch) decides what to load and
save; the worker side (`worker_side`) moves the bytes between the paged KV
cache and the store. They share the chunk/key layout (`layout`) and talk
through the plain messages in `metadata`.
"""
