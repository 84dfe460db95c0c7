"""KV connector layer: the engine's only door to the tiered KV store (`pagoda.kvstore`).

Implements the KV connector contract that core owns
(`pagoda.core.connector.kv`, with its per-step structs in
`pagoda.core.connector.kv_metadata`). The scheduler side (`scheduler_side`,
no torch) decides what to load and save; the worker side (`worker_side`)
moves the bytes between the paged KV cache and the store. They share the
chunk/key layout (`layout`). `factory` builds both sides and, for the worker
side, the store and the lookup server the scheduler side asks; the engine
and the worker call only the factory.
"""
