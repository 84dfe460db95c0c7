"""KV store layer: storage tiers, one module per kind of storage behind the `StorageTier` interface."""
