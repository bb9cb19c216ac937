"""ESM2 against fair-esm ``ESM2`` and HF ``EsmForMaskedLM`` with random weights (fp32, 1e-5 of
the reference's scale)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.reference import fair_esm_model, hf_model, rel_err, to_esmjax

from esmjax.config import esm2_from_shape
from esmjax.models import alphabet as tok

TOL = 1e-5
SEQS = [
    "MKTVRQERLKSIVRILERSKEPVSGAQLAEELSVSRQVIVQDIAYLRSLGYNIVATPRGYVLAGG",
    "KALTA<mask>ISQPAA",
    "MKTV",
    "XBUZO.-ACD<mask><mask>",
]
SHAPES = [(2, 32, 4), (3, 48, 3), (2, 40, 5), (1, 64, 8)]  # includes head counts 3 and 5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}_E{}_H{}".format(*s))
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_matches_fair_esm(shape, padded):
    n, e, h = shape
    ref = fair_esm_model(n, e, h, seed=sum(shape))
    model = to_esmjax(ref.state_dict(), esm2_from_shape(n, e, h), "fair-esm")
    seqs = SEQS if padded else [SEQS[0][:20], SEQS[0][20:40]]
    toks = tok.batch_encode(seqs)
    with torch.no_grad():
        r = ref(torch.from_numpy(toks).long(), repr_layers=list(range(n + 1)), return_contacts=True)
    out = model(jnp.asarray(toks), repr_layers=tuple(range(n + 1)), return_contacts=True)
    keep = toks != tok.PAD
    for i in range(n + 1):
        assert (
            rel_err(
                np.asarray(out["representations"][i])[keep], r["representations"][i].numpy()[keep]
            )
            < TOL
        ), i
    assert rel_err(np.asarray(out["logits"])[keep], r["logits"].numpy()[keep]) < TOL
    att = np.asarray(out["attentions"])
    assert rel_err(att, r["attentions"].numpy()) < TOL
    for j in range(len(seqs)):
        m = int(keep[j].sum()) - 2
        assert (
            np.abs(np.asarray(out["contacts"])[j, :m, :m] - r["contacts"].numpy()[j, :m, :m]).max()
            < TOL
        )


@pytest.mark.parametrize("shape", [(2, 32, 4), (3, 48, 3)], ids=lambda s: "L{}_E{}_H{}".format(*s))
def test_matches_hf(shape):
    n, e, h = shape
    ref = hf_model(n, e, h, seed=7 + n)
    model = to_esmjax(ref.state_dict(), esm2_from_shape(n, e, h), "hf")
    toks = tok.batch_encode(SEQS)
    attn = torch.from_numpy(toks != tok.PAD).long()
    with torch.no_grad():
        r = ref(torch.from_numpy(toks).long(), attention_mask=attn, output_hidden_states=True)
        contacts = ref.predict_contacts(torch.from_numpy(toks).long(), attn)
    out = model(jnp.asarray(toks), repr_layers=tuple(range(n + 1)), return_contacts=True)
    keep = toks != tok.PAD
    for i in range(n + 1):
        assert (
            rel_err(np.asarray(out["representations"][i])[keep], r.hidden_states[i].numpy()[keep])
            < TOL
        ), i
    assert rel_err(np.asarray(out["logits"])[keep], r.logits.numpy()[keep]) < TOL
    for j in range(len(SEQS)):
        m = int(keep[j].sum()) - 2
        assert (
            np.abs(np.asarray(out["contacts"])[j, :m, :m] - contacts.numpy()[j, :m, :m]).max() < TOL
        )


def test_token_dropout_factor_without_masks():
    """Layer 0 is 0.88 x the embedding for an unmasked sequence, 0.88/(1-1/6) x with one mask in
    6 tokens."""
    ref = fair_esm_model(1, 32, 4, seed=3)
    model = to_esmjax(ref.state_dict(), esm2_from_shape(1, 32, 4), "fair-esm")
    emb = np.asarray(model.embed_tokens.embedding[...])
    t = tok.batch_encode(["ACDE"])
    h0 = np.asarray(model(jnp.asarray(t), repr_layers=(0,))["representations"][0])[0]
    np.testing.assert_allclose(h0, 0.88 * emb[t[0]], rtol=1e-6)
    t = tok.batch_encode(["AC<mask>E"])
    h0 = np.asarray(model(jnp.asarray(t), repr_layers=(0,))["representations"][0])[0]
    np.testing.assert_allclose(h0[1], 0.88 / (1 - 1 / 6) * emb[t[0][1]], rtol=1e-6)
    assert np.all(h0[3] == 0)
