"""Models as they are shared: LoRA files, external VAEs, diffusers pipeline folders, tensor-by-tensor file IO."""
