"""Input pipeline: dataset building, cluster-weighted sampling, packing and MLM masking (see the
module docstrings)."""
