"""Ray and DeepSpeed adapters of the image path (the only image modules that import them): ZeRO fine-tuning
on Ray Train, consolidation of ZeRO checkpoints, and Ray Data batch inference for offline images."""
