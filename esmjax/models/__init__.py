"""Pure Flax NNX model code (no I/O): layers, alphabet, ESM-2, ESMFold, geometry."""
