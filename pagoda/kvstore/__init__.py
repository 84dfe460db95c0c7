"""KV store layer: keeps KV for token prefixes outside the engine's paged cache, in tiers.

Chunk keys (`keys`, `token_database`), the stored entry format (`entry`),
eviction policies (`policies`), tiers (`tiers/`: CPU memory, disk, Redis),
the `storage_manager` that orders them, the `--kv-store` syntax (`config`)
and the cross-process prefix lookup (`lookup`). The engine reaches all of it
through the KV connector (`pagoda.kv_connector`). Nothing here imports torch.
"""
