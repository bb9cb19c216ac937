"""Zero-shot variant effects: masked-marginal scores equal a direct computation with the model,
Spearman on a slice of the TEM-1 scan (fair-esm ``P62593.fasta``), both input layouts, and the
errors for mutants that do not fit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esmjax.cli import main as cli
from esmjax.config import MeshConfig
from esmjax.evaluate import variants as vr
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.models.alphabet import BOS, EOS, MASK, TOKEN_TO_ID, encode
from esmjax.parallel import sharding as shd

N_SLICE = 60


@pytest.fixture(scope="module")
def dms_path(shared_data):
    return shared_data / "esm_examples" / "P62593.fasta"


@pytest.fixture(scope="module")
def slice_file(dms_path, tmp_path_factory):
    """Every 90th record: N_SLICE variants across the fitness range (the file is sorted by fitness,
    and its first records are nearly all synonymous)."""
    lines = dms_path.read_text().splitlines()
    picked = [line for k in range(N_SLICE) for line in lines[2 * 90 * k : 2 * 90 * k + 2]]
    p = tmp_path_factory.mktemp("dms") / "slice.fasta"
    p.write_text("\n".join(picked) + "\n")
    return p


def test_read_scan_and_wild_type(dms_path):
    dms = vr.read_dms(dms_path)
    assert dms.wild_type_source == "derived" and len(dms.variants) == 5397 and dms.skipped == {}
    first = dms_path.read_text().splitlines()[
        1
    ]  # >0|beta-lactamase_P20P|...: synonymous, so the wild type itself
    assert dms.wild_type == first and dms.wild_type.startswith("MSIQHFRVALIPFFAAFCLPV")
    v = dms.variants[-1]
    assert (v.name, v.mutations, v.line) == ("R159P", (vr.Mutation("R", 158, "P"),), 2 * 5397 - 1)
    assert v.fitness == pytest.approx(-0.008030678)
    assert vr.parse_mutant("A42G:V50L", 1, "x") == (
        vr.Mutation("A", 41, "G"),
        vr.Mutation("V", 49, "L"),
    )
    assert vr.parse_mutant("M3K", 3, "x") == (vr.Mutation("M", 0, "K"),)


def test_scores_equal_direct_computation(ckpt, dms_path):
    wt = vr.read_dms(dms_path).wild_type
    variants = [
        vr.Variant("P20P", (vr.Mutation("P", 19, "P"),), 0.0, 0),
        vr.Variant("M1A", (vr.Mutation("M", 0, "A"),), 0.0, 0),
        vr.Variant("W286Y", (vr.Mutation("W", 285, "Y"),), 0.0, 0),
        vr.Variant("S2K:H5D", (vr.Mutation("S", 1, "K"), vr.Mutation("H", 4, "D")), 0.0, 0),
    ]
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    scores = vr.masked_marginal_scores(
        Engine(checkpoint.load_model(ckpt, mesh=mesh)[0], mesh), wt, variants
    )
    # Directly: one unpadded row per mutation, the wild type with that position masked, on one
    # device.
    model, _ = checkpoint.load_model(ckpt)
    muts = [m for v in variants for m in v.mutations]
    rows = np.repeat(np.concatenate([[BOS], encode(wt), [EOS]])[None], len(muts), 0)
    at = np.array([m.position + 1 for m in muts])
    rows[np.arange(len(muts)), at] = MASK
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(rows))["logits"], -1))[
        np.arange(len(muts)), at
    ]
    direct = {
        m: float(lp[k, TOKEN_TO_ID[m.mt]] - lp[k, TOKEN_TO_ID[m.wt]]) for k, m in enumerate(muts)
    }
    expected = [sum(direct[m] for m in v.mutations) for v in variants]
    assert scores[0] == 0.0
    np.testing.assert_allclose(scores, expected, atol=2e-5)
    assert abs(scores[3]) > 1e-4


def _ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks for ties
        r[x == v] = r[x == v].mean()
    return r


def test_spearman_on_a_slice(ckpt, slice_file, tmp_path, capsys):
    assert vr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert vr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(vr.spearman([1, 1, 1], [1, 2, 3]))
    out = tmp_path / "rep"
    rc = cli(
        [
            "evaluate",
            "variants",
            "--checkpoint",
            str(ckpt),
            "--dms",
            str(slice_file),
            "--plot",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "variants.json").read_text())
    res = rep["results"]
    assert (
        res["variants"] == N_SLICE
        and res["wild_type_source"] == "derived"
        and len(res["wild_type"]) == 286
    )
    rows = [ln.split(",") for ln in (out / "variants_scores.csv").read_text().splitlines()[1:]]
    scores = np.array([float(r[2]) for r in rows])
    fitness = np.array([float(r[1]) for r in rows])
    rx, ry = _ranks(scores), _ranks(fitness)
    rho = np.corrcoef(rx, ry)[0, 1]
    assert res["spearman"] == pytest.approx(rho, abs=1e-4)  # scores in the CSV carry 6 decimals
    assert abs(res["spearman"]) < 0.5  # a random model
    assert (out / "variants_scatter.png").stat().st_size > 10_000
    assert "spearman" in capsys.readouterr().out
    # The CSV layout with the wild type given scores the same variants identically.
    csv_path = tmp_path / "scan.csv"
    csv_path.write_text("mutant,score\n" + "".join(f"{r[0]},{r[1]}\n" for r in rows[:10]))
    wt_path = tmp_path / "wt.fasta"
    wt_path.write_text(f">tem1\n{res['wild_type']}\n")
    out2 = tmp_path / "rep2"
    assert (
        cli(
            [
                "evaluate",
                "variants",
                "--checkpoint",
                str(ckpt),
                "--dms",
                str(csv_path),
                "--wt-sequence",
                str(wt_path),
                "--out",
                str(out2),
                "--no-progress",
            ]
        )
        == 0
    )
    rows2 = [ln.split(",") for ln in (out2 / "variants_scores.csv").read_text().splitlines()[1:]]
    assert [r[2] for r in rows2] == [r[2] for r in rows[:10]]


def test_mismatched_mutants(slice_file, tmp_path, ckpt, capsys):
    text = slice_file.read_text().splitlines()
    wt = vr.read_dms(slice_file).wild_type
    # FASTA layout: record 7 (header on line 13) claims a wild-type residue the sequence does not
    # have.
    bad = list(text)
    name = bad[12].split("|")[1].rsplit("_", 1)[1]
    wrong = "W" if name[0] != "W" else "A"
    bad[12] = bad[12].replace(f"_{name}|", f"_{wrong}{name[1:]}|")
    f = tmp_path / "bad.fasta"
    f.write_text("\n".join(bad) + "\n")
    with pytest.raises(
        vr.DMSError, match=rf"bad.fasta:13: mutant {wrong}{name[1:]}: wild-type residue {wrong} "
    ):
        vr.read_dms(f)
    with pytest.raises(vr.DMSError, match="bad.fasta:13: mutant"):
        vr.read_dms(f, wt=wt)
    # CSV: the line is named; so are out-of-range positions and unreadable mutants.
    c = tmp_path / "m.csv"
    c.write_text(f"mutant,score\n{wt[0]}1A,0.5\n{'W' if wt[4] != 'W' else 'A'}5K,0.1\n")
    with pytest.raises(
        vr.DMSError, match="m.csv:3: mutant .5K: wild-type residue . does not match"
    ):
        vr.read_dms(c, wt=wt)
    c.write_text("mutant,score\nA999G,0.5\n")
    with pytest.raises(vr.DMSError, match="m.csv:2: mutant A999G: position 999 is outside"):
        vr.read_dms(c, wt=wt)
    c.write_text("mutant,score\n42G,0.5\n")
    with pytest.raises(vr.DMSError, match="m.csv:2: cannot read mutant '42G'"):
        vr.read_dms(c, wt=wt)
    c.write_text("variant,fitness\nM1A,0.5\n")
    with pytest.raises(vr.DMSError, match="lacks column"):
        vr.read_dms(c, wt=wt)
    with pytest.raises(vr.DMSError, match="needs --wt-sequence"):
        vr.read_dms(c)
    # From the command line: one line naming the file and line, exit status 2.
    assert cli(["evaluate", "variants", "--checkpoint", str(ckpt), "--dms", str(f)]) == 2
    assert "bad.fasta:13: mutant" in capsys.readouterr().err
