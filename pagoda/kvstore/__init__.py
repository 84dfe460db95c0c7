"""KV store layer: keeps KV for token prefixes outside the engine's paged cache, in tiers.

Chunk keys (`keys`, `token_database`), the stored entry format (`entry`),
eviction policies (`policies`), tiers (`tiers/`: CPU memory, disk, Redis),
the `storage_manager` that orders them, `build` (opens the tiers a parsed
`--kv-store` config names; the syntax itself is plain data in
`pagoda.kv_store_spec`) and the cross-process prefix lookup (`lookup`). The
engine reaches all of it through the KV connector (`pagoda.kv_connector`),
whose factory is the only code that builds a store. Nothing here imports
torch.
"""
