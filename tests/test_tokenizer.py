"""Token ids equal fair-esm's ``Alphabet`` / ``BatchConverter`` on tricky strings."""

import numpy as np
import pytest

from esmjax.models import alphabet as tok


@pytest.fixture(scope="module")
def alphabet():
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


def test_vocabulary_order(alphabet):
    assert list(tok.TOKENS) == alphabet.all_toks
    assert (tok.BOS, tok.PAD, tok.EOS, tok.UNK, tok.MASK) == (0, 1, 2, 3, 32)
    assert (
        alphabet.cls_idx == tok.BOS
        and alphabet.padding_idx == tok.PAD
        and alphabet.mask_idx == tok.MASK
    )


TRICKY = [
    "MKTVRQG",
    "KALTA<mask>ISQP",
    "XBUZO.-",
    "<mask>ACD<mask>",
    "AC<unk>D<eos>E",
    "M K T V",
    "A" * 40,
    "<cls>A",
]


@pytest.mark.parametrize("seq", TRICKY)
def test_ids_equal_fair_esm(alphabet, seq):
    assert tok.encode(seq).tolist() == alphabet.encode(seq)


def test_lower_case_reads_as_upper(alphabet):
    assert tok.encode("mktvRQg").tolist() == alphabet.encode("MKTVRQG")
    assert tok.encode("ka<mask>lt").tolist() == alphabet.encode("KA<mask>LT")


def test_batch_converter_padding_and_truncation(alphabet):
    seqs = ["MKTVRQG", "KALTA<mask>ISQP", "XBUZO.-"]
    for trunc in (None, 4):
        bc = alphabet.get_batch_converter(truncation_seq_length=trunc)
        _, _, ref = bc([(str(i), s) for i, s in enumerate(seqs)])
        np.testing.assert_array_equal(
            tok.batch_encode(seqs, truncation_seq_length=trunc), ref.numpy()
        )
    assert tok.encode("MKTVRQG").tolist() == [
        20,
        15,
        11,
        7,
        10,
        16,
        6,
    ]  # fair-esm tests/test_alphabet.py


def test_unknown_character_is_an_error():
    with pytest.raises(tok.TokenizeError, match="'J'"):
        tok.encode("ACJD")
    with pytest.raises(tok.TokenizeError, match="<foo>"):
        tok.encode("AC<foo>D")
