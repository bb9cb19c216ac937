"""``esmjax embed --format fair-esm``: the same files as fair-esm's ``esm-extract``, key by key.

fair-esm 2.0.0 (the PyPI release) does not ship ``esm/scripts/extract.py``, so ``esm_extract``
below runs its pipeline from fair-esm's own parts: the model loader, ``FastaBatchedDataset``
(labels and batches) and ``BatchConverter`` (truncation), then the script's slicing and file naming.
"""

import argparse
import sys

import numpy as np
import torch
from support.reference import fair_esm_model

from esmjax.cli import main as cli

SHAPE = (3, 32, 4)  # layers, width, heads
TRUNCATION = 20
FASTA = (
    ">sp|P1|A_HUMAN first protein OS=Homo sapiens\n"
    + "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n"  # 33 residues: truncated to 20
    + ">short\nMKTW\n"
    + ">serine/threonine kinase fragment\nACDEFGHIKLMNPQ\nRSTVWY\n"  # '/' makes a subfolder
    + ">mid one\nGGSAAKLVVEEKR\n"
)


def save_fair_esm_pt(model, path):
    """A .pt as fair-esm publishes them: fairseq prefixes, a Namespace cfg, separate regression."""
    sd = model.state_dict()
    body = {
        ("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
        for k, v in sd.items()
        if not k.startswith("contact_head")
    }
    layers, dim, heads = SHAPE
    cfg = argparse.Namespace(
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_attention_heads=heads,
        encoder_ffn_embed_dim=4 * dim,
        token_dropout=True,
        arch="roberta_large",
    )
    torch.save({"cfg": {"model": cfg}, "model": body}, path)
    reg = {k: v for k, v in sd.items() if k.startswith("contact_head")}
    torch.save({"model": reg}, path.with_name(path.stem + "-contact-regression.pt"))


def esm_extract(pt, fasta, out, repr_layers, include, truncation, toks_per_batch=64):
    """esm-extract's ``run``: small batches so that records share padded batches."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):  # torch >= 2.6 weights_only
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(pt)
    model.eval()
    dataset = esm.FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(truncation), batch_sampler=batches
    )
    n_layers = model.num_layers
    layers = [(i + n_layers + 1) % (n_layers + 1) for i in repr_layers]
    with torch.no_grad():
        for labels, strs, toks in loader:
            res = model(toks, repr_layers=layers, return_contacts="contacts" in include)
            reps = res["representations"]
            for i, label in enumerate(labels):
                n = min(truncation, len(strs[i]))
                result = {"label": label}
                if "per_tok" in include:
                    result["representations"] = {
                        k: t[i, 1 : n + 1].clone() for k, t in reps.items()
                    }
                if "mean" in include:
                    result["mean_representations"] = {
                        k: t[i, 1 : n + 1].mean(0).clone() for k, t in reps.items()
                    }
                if "bos" in include:
                    result["bos_representations"] = {k: t[i, 0].clone() for k, t in reps.items()}
                if "contacts" in include:
                    result["contacts"] = res["contacts"][i, :n, :n].clone()
                path = out / f"{label}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(result, path)


def assert_same(got, want, where):
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert list(got) == list(want), where  # the same keys (layers as ints) in the same order
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5, err_msg=where)
    else:
        assert got == want, where


def test_files_match_esm_extract(tmp_path):
    pt = tmp_path / "esm2_t3_test_UR50D.pt"  # fair-esm reads ESM-2 only from an esm2_* name
    save_fair_esm_pt(fair_esm_model(*SHAPE, seed=5), pt)
    fasta = tmp_path / "in.fa"
    fasta.write_text(FASTA)
    ck, got, want = tmp_path / "ck", tmp_path / "got", tmp_path / "want"
    assert cli(["convert", str(pt), str(ck)]) == 0
    include = ["mean", "per_tok", "bos", "contacts"]
    argv = ["embed", "--checkpoint", str(ck), "--fasta", str(fasta), "--out", str(got)]
    argv += ["--format", "fair-esm", "--repr-layers", "-1", "0", "-2", "--include", *include]
    assert cli([*argv, "--truncation-seq-length", str(TRUNCATION), "--no-progress"]) == 0
    esm_extract(pt, fasta, want, [-1, 0, -2], include, TRUNCATION)

    names = sorted(p.relative_to(want) for p in want.rglob("*.pt"))
    assert len(names) == 4 and sorted(p.relative_to(got) for p in got.rglob("*.pt")) == names
    for name in names:
        w = torch.load(want / name, weights_only=True)
        assert_same(torch.load(got / name, weights_only=True), w, str(name))
    first = torch.load(got / "sp|P1|A_HUMAN first protein OS=Homo sapiens.pt", weights_only=True)
    assert first["representations"][3].shape == (TRUNCATION, SHAPE[1])
    assert first["contacts"].shape == (TRUNCATION, TRUNCATION)


def test_bad_input_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    fasta = tmp_path / "in.fa"
    out = tmp_path / "out"
    argv = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out)]
    argv += ["--format", "fair-esm"]
    fasta.write_text(">a b\nMKT\n>a b\nMKV\n")  # the same label twice: one file
    assert cli(argv) == 2
    assert "repeats line 1" in capsys.readouterr().err
    fasta.write_text(">a/../../x\nMKT\n")  # a label that leaves the output folder
    assert cli(argv) == 2
    assert "not a usable file name" in capsys.readouterr().err
    fasta.write_text(">a\nMKT\n")
    assert cli([*argv, "--include", "logits"]) == 2
    assert "hold none" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch", None)  # PyTorch not installed
    assert cli(argv) == 2
    assert "pip install 'esmjax[torch]'" in capsys.readouterr().err
    assert not out.exists()


def test_npz_bos_matches_fair_esm(ckpt, tmp_path):
    """``--include bos`` in the npz format: the same arrays as the fair-esm format's."""
    fasta = tmp_path / "in.fa"
    fasta.write_text(">p1 a protein\nMKTAYIAKQRQISF\n")
    argv = ["embed", "--checkpoint", str(ckpt), "--fasta", str(fasta), "--no-progress"]
    argv += ["--layers", "0", "-1", "--include", "bos", "mean"]
    assert cli([*argv, "--out", str(tmp_path / "npz")]) == 0
    assert cli([*argv, "--out", str(tmp_path / "pt"), "--format", "fair-esm"]) == 0
    z = np.load(tmp_path / "npz" / "p1.npz")
    pt = torch.load(tmp_path / "pt" / "p1 a protein.pt", weights_only=True)
    assert sorted(z.files) == ["bos_0", "bos_2", "mean_0", "mean_2"]
    for layer in (0, 2):
        np.testing.assert_array_equal(z[f"bos_{layer}"], pt["bos_representations"][layer].numpy())
        np.testing.assert_array_equal(z[f"mean_{layer}"], pt["mean_representations"][layer])
    assert not np.allclose(z["bos_2"], z["mean_2"])
