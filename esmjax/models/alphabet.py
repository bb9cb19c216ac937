"""The 33-token ESM alphabet (fair-esm ``Alphabet.from_architecture("ESM-1b")``) and batch encoding.

Token order: ``<cls> <pad> <eos> <unk>``, the 25 residue letters and ``. -``, ``<null_1>``,
``<mask>``. ``<cls>`` (0) serves as BOS. Special tokens written inside a sequence (``KAL<mask>TA``)
read as one token, and whitespace is ignored, as in fair-esm's ``Alphabet.tokenize``.

Lower-case residue letters read as their upper-case tokens (``mktA`` = ``MKTA``), where the
references give no usable answer: fair-esm 2.0.0's ``BatchConverter`` (``Alphabet.encode``) raises
``KeyError`` (its ``tokenize`` keeps an unknown run such as ``ta`` as one piece), and HF's
``EsmTokenizer`` (transformers 5.24) turns each run of lower-case letters into a single ``<unk>``,
so ``MKtaYIAK`` becomes 7 tokens for 8 residues and every later position shifts (per-residue
outputs no longer line up with the sequence). Lower case is the FASTA convention for the same
residues (NCBI reads it as upper case; SCOPe/ASTRAL files are all lower case; soft-masked regions),
so esmjax follows the convention, one token per residue. FASTA records are upper-cased when read
(``esmjax.io.fasta``), and ``encode`` maps both cases, for sequences given directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from esmjax.errors import InputError

PREPEND = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUES = tuple("LAGVSERTIDPKQNFYMHWCXBUZO.-")
TOKENS: tuple[str, ...] = PREPEND + RESIDUES + ("<null_1>", "<mask>")
TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}

BOS = TOKEN_TO_ID["<cls>"]
PAD = TOKEN_TO_ID["<pad>"]
EOS = TOKEN_TO_ID["<eos>"]
UNK = TOKEN_TO_ID["<unk>"]
MASK = TOKEN_TO_ID["<mask>"]
VOCAB_SIZE = len(TOKENS)

# The 20 standard amino acids, as ids: what MLM random replacement draws from.
STANDARD_AA = tuple("ACDEFGHIKLMNPQRSTVWY")
STANDARD_AA_IDS = np.array([TOKEN_TO_ID[a] for a in STANDARD_AA], np.int32)

_SPECIAL_RE = re.compile(r"(<[^<>]*>)")
_LUT = np.full(256, -1, np.int32)
for _c in RESIDUES:
    _LUT[ord(_c)] = TOKEN_TO_ID[_c]
    _LUT[ord(_c.lower())] = TOKEN_TO_ID[_c]


class TokenizeError(InputError):
    """A sequence holds a character or a ``<...>`` token outside the alphabet."""


def encode(seq: str) -> np.ndarray:
    """Residue string (special tokens allowed inline) -> int32 ids, without BOS/EOS.

    Lower-case residue letters read as upper case (the module's docstring says why: the
    references refuse them or shift positions); whitespace is dropped.
    """
    out: list[np.ndarray] = []
    for part in _SPECIAL_RE.split(seq):
        if not part:
            continue
        if part.startswith("<") and part.endswith(">"):
            if part not in TOKEN_TO_ID:
                raise TokenizeError(f"unknown special token {part!r}")
            out.append(np.array([TOKEN_TO_ID[part]], np.int32))
            continue
        part = "".join(part.split())
        raw = np.frombuffer(part.encode("latin-1", errors="replace"), np.uint8)
        ids = _LUT[raw]
        if (ids < 0).any():
            bad = int(np.argmax(ids < 0))
            raise TokenizeError(f"character {part[bad]!r} is not in the ESM alphabet")
        out.append(ids)
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def decode(ids: Sequence[int]) -> str:
    return "".join(TOKENS[int(i)] for i in ids)


def encode_with_specials(seq: str, truncation_seq_length: int | None = None) -> np.ndarray:
    """``[BOS] + ids[:truncation] + [EOS]``; truncation applies to residues before BOS/EOS
    (fair-esm)."""
    ids = encode(seq)
    if truncation_seq_length is not None:
        ids = ids[:truncation_seq_length]
    return np.concatenate([[BOS], ids, [EOS]]).astype(np.int32)


def batch_encode(
    seqs: Sequence[str], truncation_seq_length: int | None = None, pad_to: int | None = None
) -> np.ndarray:
    """[B, T] ids, each ``BOS seq EOS``, right-padded with PAD to the longest (or to ``pad_to``)."""
    rows = [encode_with_specials(s, truncation_seq_length) for s in seqs]
    width = max((len(r) for r in rows), default=2)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({width})")
        width = pad_to
    out = np.full((len(rows), width), PAD, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
