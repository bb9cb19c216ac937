"""Checkpoint conversion: fair-esm and HF round trips, safe loading, and convert + embed end to
end."""

import argparse
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
from support.reference import fair_esm_model, hf_model, rel_err

from esmjax.cli import main as cli
from esmjax.config import esm2_from_shape
from esmjax.io import checkpoint
from esmjax.io import convert_esm2 as convert
from esmjax.io.torch_pt import UnsafeCheckpointError, load_pt

# A configuration no other test uses: 4 layers, width 60, 5 heads (head_dim 12).
SHAPE = (4, 60, 5)


def save_fair_esm_pt(model, path, num_layers, dim, heads):
    """Writes a .pt laid out like the published files (fairseq prefixes, Namespace cfg, separate
    regression)."""
    sd = model.state_dict()
    body = {}
    for k, v in sd.items():
        if k.startswith("contact_head"):
            continue
        body[("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k] = v
    ns = argparse.Namespace(
        encoder_layers=num_layers,
        encoder_embed_dim=dim,
        encoder_attention_heads=heads,
        encoder_ffn_embed_dim=4 * dim,
        token_dropout=True,
        arch="roberta_large",
    )
    torch.save({"cfg": {"model": ns}, "model": body}, path)
    reg = {k: v for k, v in sd.items() if k.startswith("contact_head")}
    torch.save({"model": reg}, path.with_name(path.stem + "-contact-regression.pt"))


@pytest.fixture(scope="module")
def fair(tmp_path_factory):
    d = tmp_path_factory.mktemp("fair")
    model = fair_esm_model(*SHAPE, seed=11)
    pt = d / "esm2_t4_test_UR50D.pt"
    save_fair_esm_pt(model, pt, *SHAPE)
    return model, pt


def test_fair_esm_round_trip_is_bit_identical(fair, tmp_path):
    model, pt = fair
    cfg, params, notes = convert.read_fairesm(pt)
    assert cfg == esm2_from_shape(*SHAPE) and any("contact-regression" in n for n in notes)
    checkpoint.save_converted(tmp_path / "ck", cfg, params)
    restored, step = checkpoint.load_model(tmp_path / "ck")
    assert step == 0
    out = tmp_path / "esm2_back.pt"
    convert.write_fairesm(checkpoint.params_numpy(restored), restored.cfg, out)
    back = load_pt(out)["model"]
    back.update(load_pt(tmp_path / "esm2_back-contact-regression.pt")["model"])
    orig = load_pt(pt)["model"]
    orig.update(load_pt(pt.with_name(pt.stem + "-contact-regression.pt"))["model"])
    assert set(back) == set(orig)
    for k in orig:
        assert back[k].dtype == orig[k].dtype and np.array_equal(back[k], orig[k]), k
    # fair-esm itself loads the export.
    import esm

    data = torch.load(out, weights_only=False)
    reg = torch.load(tmp_path / "esm2_back-contact-regression.pt", weights_only=False)
    m, _ = esm.pretrained.load_model_and_alphabet_core("esm2_back", data, reg)
    ref = model.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_hf_round_trip(tmp_path):
    ref = hf_model(2, 32, 4, seed=5)
    ref.save_pretrained(tmp_path / "hf")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    assert cli(["export", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    from transformers import EsmForMaskedLM

    back = EsmForMaskedLM.from_pretrained(tmp_path / "hf2")
    for k, v in ref.state_dict().items():
        if k.endswith(
            "inv_freq"
        ):  # transformers does not save this buffer; it recomputes it on load
            continue
        assert torch.equal(back.state_dict()[k], v), k
    # Our HF export keeps inv_freq, so esmjax -> HF -> esmjax is exact, rotary buffer included.
    _, p1, _ = convert.read_hf(tmp_path / "hf2")
    p0 = checkpoint.params_numpy(checkpoint.load_model(tmp_path / "ck")[0])
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        assert np.array_equal(a, b)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"model": {"w": Payload()}}, protocol=2))
    # Sanity: the payload really would run under a plain unpickler.
    with zipfile.ZipFile(path) as zf:
        pickle.loads(zf.read("evil/data.pkl"))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"builtin_*\.eval"):
        load_pt(path)
    assert cli(["convert", str(path), str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_wrong_shapes_are_an_error(fair, tmp_path):
    _, pt = fair
    cfg, params, _ = convert.read_fairesm(pt)
    params["layers"]["fc1"]["bias"] = params["layers"]["fc1"]["bias"][:, :-1]
    with pytest.raises(checkpoint.CheckpointError, match="fc1"):
        checkpoint.save_converted(tmp_path / "x", cfg, params)
    assert not (tmp_path / "x").exists()


def test_convert_then_embed_matches_fair_esm(fair, tmp_path, shared_data):
    """The 'done when' check: an unseen configuration, converted by the CLI and embedded by the
    CLI."""
    model, pt = fair
    ck = tmp_path / "ck"
    assert cli(["convert", str(pt), str(ck)]) == 0
    fasta = shared_data / "esm_examples" / "few_proteins.fasta"
    out = tmp_path / "emb"
    rc = cli(
        [
            "embed",
            "--checkpoint",
            str(ck),
            "--fasta",
            str(fasta),
            "--out",
            str(out),
            "--layers",
            "all",
            "--include",
            "per_tok",
            "mean",
            "logits",
            "contacts",
            "--no-progress",
        ]
    )
    assert rc == 0
    import esm

    from esmjax.io.fasta import read_fasta, sanitize_id

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    bc = alphabet.get_batch_converter(truncation_seq_length=1022)
    for rec in read_fasta(fasta):
        _, _, toks = bc([(rec.id, rec.sequence)])
        with torch.no_grad():
            r = model(toks, repr_layers=list(range(SHAPE[0] + 1)), return_contacts=True)
        got = np.load(out / f"{sanitize_id(rec.id)}.npz")
        n = min(len(rec.sequence), 1022)
        for layer in range(SHAPE[0] + 1):
            want = r["representations"][layer][0, 1 : n + 1].numpy()
            assert rel_err(got[f"repr_{layer}"], want) < 1e-5, layer
            assert rel_err(got[f"mean_{layer}"], want.mean(0)) < 1e-5
        assert rel_err(got["logits"], r["logits"][0, 1 : n + 1].numpy()) < 1e-5
        assert np.abs(got["contacts"] - r["contacts"][0].numpy()).max() < 1e-5
