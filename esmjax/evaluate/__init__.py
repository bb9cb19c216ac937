"""Evaluation of saved checkpoints: masked-LM and pseudo-perplexity, unsupervised contact precision,
zero-shot variant effects (``esmjax evaluate``)."""
