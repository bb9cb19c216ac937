"""BERT-style masked-language-model corruption as ESM-2 was trained (Lin et al. 2023; Devlin et al.
2019).

15% of residue tokens are selected (never BOS, EOS or padding); of those 80% become ``<mask>``, 10%
a random standard amino acid and 10% stay unchanged. The loss is computed on the selected positions
only. Pure NumPy, driven by an explicit ``np.random.Generator`` so that batches are reproducible
from (seed, step, row).
"""

from __future__ import annotations

import numpy as np

from esmjax.models.alphabet import MASK, STANDARD_AA_IDS, TOKEN_TO_ID

# Residue ids (letters and gap characters): 4 ("L") .. 30 ("-"). Specials and <null_1> are never
# selected.
_FIRST_RESIDUE = TOKEN_TO_ID["L"]
_LAST_RESIDUE = TOKEN_TO_ID["-"]


def maskable(tokens: np.ndarray) -> np.ndarray:
    """Positions that may be selected for the MLM loss: residue tokens only."""
    return (tokens >= _FIRST_RESIDUE) & (tokens <= _LAST_RESIDUE)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
) -> dict[str, np.ndarray]:
    """Corrupts ``tokens`` [R, S] for MLM.

    Returns:
      ``tokens`` (model input, int32), ``targets`` (the original ids, int32) and ``loss_mask``
      (bool, the selected positions), all [R, S].
    """
    tokens = np.asarray(tokens, np.int32)
    u = rng.random(tokens.shape)
    selected = maskable(tokens) & (u < mask_prob)
    # Re-use the same uniform draw to split the selected positions 80/10/10 (u/mask_prob is uniform
    # on [0, 1)).
    v = u / mask_prob
    to_mask = selected & (v < mask_token_prob)
    to_random = selected & (v >= mask_token_prob) & (v < mask_token_prob + random_token_prob)
    inputs = tokens.copy()
    inputs[to_mask] = MASK
    inputs[to_random] = rng.choice(STANDARD_AA_IDS, size=int(to_random.sum()))
    return {"tokens": inputs, "targets": tokens, "loss_mask": selected}
