"""File formats and weights: FASTA, structures, the safe .pt reader, checkpoints, conversions."""
