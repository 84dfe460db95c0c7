"""Engine layer: from user prompts to `EngineCore` requests and back to `RequestOutput`s."""
