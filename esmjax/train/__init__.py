"""ESM-2 masked-language-model pretraining: optimizer, sharded state, step, checkpoints and the
loop."""
