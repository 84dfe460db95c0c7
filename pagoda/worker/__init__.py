"""Worker layer: owns the device, the model, the KV tensors, and runs one step at a time."""
