"""ESMFold (Lin et al. 2023) in Flax NNX: config, trunk, structure module, heads, model and
checkpoints."""
