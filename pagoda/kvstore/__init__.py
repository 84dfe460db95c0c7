"""KV store layer: keeps KV for token prefixes outside the engine's paged cache, in tiers.

The pieces here are a library: chunk keys (`keys`, `token_database`), stored
entry format (`entry`), eviction policies (`policies`), tiers (`tiers/`) and
the `storage_manager` that orders them. The engine does not use them yet; a
KV connector will be its only door to the store.
"""
