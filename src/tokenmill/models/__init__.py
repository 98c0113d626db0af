"""Model definitions (our own PyTorch modules, so the engine owns the KV layout) and weight loading."""
