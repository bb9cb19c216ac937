"""Contact precision: hand-made maps with known answers, the shared structures (the true map scores
1.0 wherever enough contacts exist), structure parsing (models, altlocs, insertion codes, missing
residues, PDB vs mmCIF), the L1 logistic-regression fit, and ``esmjax evaluate contacts`` end to
end with ``--fit`` and ``--plot``."""

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import ESM2_PRESETS, MeshConfig
from esmjax.evaluate import contacts as ct
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.io.structures import StructureError, read_chain
from esmjax.models.alphabet import batch_encode
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd


def _target(n: int, pairs, unknown=()) -> np.ndarray:
    t = np.zeros((n, n), np.int8)
    np.fill_diagonal(t, 1)
    for i, j in pairs:
        t[i, j] = t[j, i] = 1
    for u in unknown:
        t[u, :] = t[:, u] = -1
    return t


def test_hand_made_long_range():
    # L = 30: long range (j - i >= 24) has 21 pairs; 3 are contacts.
    t = _target(30, [(0, 24), (1, 29), (5, 29)])
    p = np.zeros((30, 30))
    ranked = [
        (0, 24),
        (2, 27),
        (1, 29),
        (0, 25),
        (0, 26),
        (0, 27),
        (3, 28),
        (4, 28),
        (0, 28),
        (5, 29),
    ]
    for r, (i, j) in enumerate(ranked):
        p[i, j] = 1.0 - r / 100
    m = ct.precision_at_l(p, t, 24, None)
    # top 6 (L/5) hold 2 contacts; top 15 (L/2) all 3; P@L takes 30 but only 21 pairs exist: 3 / 30.
    assert m == {"P@L/5": 2 / 6, "P@L/2": 3 / 15, "P@L": 3 / 30}


def test_hand_made_ranges_unknown_and_ties():
    # L = 20 with residue 19 unobserved: L counts the 19 residues with coordinates.
    t = _target(20, [(0, 6), (0, 11), (2, 14), (3, 19)], unknown=[19])
    p = np.zeros((20, 20))
    p[3, 19] = 5.0  # highest score, but the pair is unknown: excluded, not a miss
    p[0, 6], p[1, 8] = 0.9, 0.8  # short: a hit and a miss on top
    p[2, 14] = 0.7  # medium: the contact is first
    short = ct.precision_at_l(p, t, 6, 12)
    # Ties (score 0) rank in pair order (0,7), (0,8), ..., (0,11), (1,7), ...
    assert short["P@L/5"] == pytest.approx(1 / 3)  # k = 3: (0,6) hit, (1,8) miss, (0,7) miss
    assert short["P@L/2"] == pytest.approx(2 / 9)  # k = 9: (0,11) is 7th
    assert short["P@L"] == pytest.approx(2 / 19)
    medium = ct.precision_at_l(p, t, 12, 24)
    assert medium["P@L/5"] == pytest.approx(1 / 3)
    # No pair has j - i >= 24 in 20 residues: undefined, left out of means.
    assert all(np.isnan(v) for v in ct.precision_at_l(p, t, 24, None).values())
    assert np.isnan(
        ct.precision_at_l(np.zeros((4, 4)), _target(4, []), 1, None)["P@L/5"]
    )  # floor(4/5) = 0
    mean = ct.mean_metrics([ct.evaluate_map(p, t), ct.evaluate_map(t.astype(float), t)])
    assert mean["short"]["P@L/5"] == pytest.approx(
        (1 / 3 + 2 / 3) / 2
    )  # the true map: 2 short contacts, k = 3
    assert np.isnan(mean["long"]["P@L"])


def _all_chains(shared_data):
    with open(shared_data / "structures" / "structures_index.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return rows, [
        read_chain(str(shared_data / "structures" / r["file"]) + ":" + r["chain"]) for r in rows
    ]


def test_shared_structures_true_map_scores_one(shared_data):
    rows, chains = _all_chains(shared_data)
    ones = 0
    for r, chain in zip(rows, chains):
        target = chain.contact_map()
        # The sequence the model reads is SEQRES (or the observed residues when the file has none).
        assert chain.sequence == (r["seqres_sequence"] or r["observed_sequence"]), r["file"]
        observed = "".join(a for a, o in zip(chain.sequence, chain.observed) if o)
        if (
            r["file"] != "alphafold/2rbg.pdb"
        ):  # the index omits 2RBG's HETATM selenomethionine 102 (MSE -> M)
            assert observed == r["observed_sequence"], r["file"]
        n_obs = int(chain.observed.sum())
        counts = ct.contact_counts(target)
        m = ct.evaluate_map(np.where(target > 0, 1.0, 0.0), target)
        for name, lo, hi in ct.RANGES:
            for metric, div in ct.DIVISORS:
                k = n_obs // div
                pairs = sum(
                    1
                    for s in range(lo, (hi or n_obs))
                    for _ in range(max(len(chain.sequence) - s, 0))
                )
                if pairs == 0 or k == 0:
                    continue
                expected = min(1.0, counts[name] / k)
                assert m[name][metric] == pytest.approx(expected), (r["file"], name, metric)
                ones += m[name][metric] == 1.0
    assert ones >= 60  # 15 chains x 9 figures, most with enough contacts


def test_parsing_conventions(shared_data):
    b = shared_data / "structures" / "biotite"
    pdb, cif = read_chain(str(b / "1aki.pdb")), read_chain(str(b / "1aki.cif"))
    assert pdb.sequence == cif.sequence and np.allclose(pdb.coords, cif.coords, atol=1e-3)
    # Multiple models: the first one. Residue 1 is Asn; its CB in MODEL 1 of the file text:
    nmr = read_chain(str(b / "1l2y.pdb"))
    assert nmr.num_models == 38
    atoms = [ln for ln in (b / "1l2y.pdb").read_text().splitlines() if ln.startswith("ATOM")]
    cb = next(ln for ln in atoms if ln[12:16] == " CB ")
    assert np.allclose(
        nmr.coords[0], [float(cb[30:38]), float(cb[38:46]), float(cb[46:54])], atol=1e-3
    )
    assert np.allclose(read_chain(str(b / "1l2y.cif")).coords, nmr.coords, atol=1e-3)
    # Glycine uses CA (residue 10 of 1L2Y is Gly).
    ca = [ln for ln in atoms if ln[12:16] == " CA "][9]
    assert ca[17:20] == "GLY" and np.allclose(
        nmr.coords[9], [float(ca[30:38]), float(ca[38:46]), float(ca[46:54])]
    )
    # Altlocs: the higher-occupancy one (3O5R Met 48: A 0.25, B 0.75).
    alt = read_chain(str(b / "3o5r.pdb"))
    lines = [
        ln
        for ln in (b / "3o5r.pdb").read_text().splitlines()
        if ln.startswith("ATOM")
        and ln[12:16] == " CB "
        and ln[17:20] == "MET"
        and ln[22:26].strip() == "48"
    ]
    xyz = {ln[16]: np.array([float(ln[30:38]), float(ln[38:46]), float(ln[46:54])]) for ln in lines}
    assert np.isclose(alt.coords, xyz["B"], atol=1e-3).all(-1).any()
    assert not np.isclose(alt.coords, xyz["A"], atol=1e-3).all(-1).any()
    # Insertion codes: 1DIX numbers its first residues 1X..4X before 2, 3, ...: all 208 are distinct
    # residues.
    ins = read_chain(str(b / "1dix.pdb"))
    assert len(ins.sequence) == 208 and ins.observed.all() and ins.sequence.startswith("ASGSKDF")
    # Missing residues: 1O1Z lacks MGSDKIHH at the N terminus (REMARK 465); SEQRES keeps them,
    # unobserved.
    miss = read_chain(str(b / "1o1z.pdb"))
    assert len(miss.sequence) == 234 and not miss.observed[:8].any() and miss.observed[8:].all()
    assert (miss.contact_map()[:8] == -1).all()
    obs = read_chain(str(b / "1o1z.pdb"), sequence="observed")
    assert (
        obs.source == "observed" and len(obs.sequence) == 226 and obs.sequence.startswith("HHHHVIV")
    )
    # Chain choice and a file without SEQRES.
    c = read_chain(str(shared_data / "esm_examples" / "5YH2.pdb") + ":C")
    assert c.chain == "C" and len(c.sequence) == 560 and int(c.observed.sum()) == 395
    assert read_chain(str(shared_data / "esm_examples" / "2N2U.pdb")).source == "observed"


def test_structure_errors(shared_data, tmp_path):
    bad = tmp_path / "bad.pdb"
    bad.write_text("HEADER    nothing here\nREMARK   1 no coordinates\nEND\n")
    with pytest.raises(StructureError, match="bad.pdb"):
        read_chain(str(bad))
    cif = tmp_path / "broken.cif"
    cif.write_text("data_x\nloop_\n_atom_site.group_PDB\n_atom_site.id\nATOM\n")
    with pytest.raises(StructureError, match="broken.cif: cannot parse as mmCIF"):
        read_chain(str(cif))
    with pytest.raises(StructureError, match="no protein chain 'Z'; protein chains: A, B"):
        read_chain(str(shared_data / "structures" / "alphafold" / "2rbg.pdb") + ":Z")
    with pytest.raises(StructureError, match="no such structure file"):
        read_chain(str(tmp_path / "missing.pdb"))
    with pytest.raises(StructureError, match="unknown structure format"):
        read_chain(str(shared_data / "esm_examples" / "few_proteins.fasta"))


def test_l1_logistic_regression_optimality():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 12)).astype(np.float32)
    w_true = np.zeros(12)
    w_true[[2, 7]] = [2.5, -1.5]
    y = (rng.random(4000) < 1 / (1 + np.exp(-(x @ w_true - 1.0)))).astype(np.float32)
    c = 0.05
    fit = ct.fit_logistic_l1(x, y, c)
    assert fit.converged and np.sign(fit.kernel[[2, 7]]).tolist() == [1, -1]
    # KKT conditions of min C*sum logloss + |w|_1: dL/dw_j = -sign(w_j) where w_j != 0, |dL/dw_j| <=
    # 1 where 0.
    z = x.astype(np.float64) @ fit.kernel + fit.bias
    g = c * x.T.astype(np.float64) @ (1 / (1 + np.exp(-z)) - y)
    nz = fit.kernel != 0
    assert np.allclose(g[nz], -np.sign(fit.kernel[nz]), atol=2e-3)
    assert np.all(np.abs(g[~nz]) <= 1 + 2e-3)
    assert abs(c * (1 / (1 + np.exp(-z)) - y).sum()) < 2e-3  # unpenalised intercept
    assert fit.nonzero < 12  # the penalty zeroes some noise features


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Its own tiny model (seed 1), not the session's: fitted on 1AKI, its head must beat the
    random one, and with the session model's weights the L1 penalty zeroes every weight."""
    d = tmp_path_factory.mktemp("ct") / "tiny"
    model = ESM2(ESM2_PRESETS["tiny"], rngs=nnx.Rngs(1))
    checkpoint.save_converted(d, model.cfg, checkpoint.params_numpy(model))
    return d


@pytest.fixture(scope="module")
def engine8(ckpt):
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    return Engine(checkpoint.load_model(ckpt, mesh=mesh)[0], mesh)


def test_predicted_contacts_are_the_models(ckpt, engine8, shared_data):
    chain = read_chain(str(shared_data / "structures" / "alphafold" / "glucagon.pdb"))
    model, _ = checkpoint.load_model(ckpt)
    direct = np.asarray(
        model(jnp.asarray(batch_encode([chain.sequence])), return_contacts=True)["contacts"][0]
    )
    pred = ct.predict_contacts(engine8, chain)  # padded to 32 tokens, on 8 devices
    assert pred.shape == (29, 29) and np.allclose(pred, direct, atol=1e-5)


def test_cli_fit_and_evaluate(ckpt, engine8, shared_data, tmp_path, capsys, caplog):
    s = shared_data / "structures"
    out, save = tmp_path / "rep", tmp_path / "fitted"
    aki = str(s / "biotite" / "1aki.pdb")
    rc = cli(
        [
            "evaluate",
            "contacts",
            "--checkpoint",
            str(ckpt),
            "--no-progress",
            "--plot",
            "--out",
            str(out),
            "--structures",
            str(s / "biotite" / "1l2y.cif"),
            aki,
            "--fit",
            aki,
            "--fit-c",
            "1.0",
            "--save",
            str(save),
        ]
    )
    assert rc == 0
    assert any("fitted on and evaluated" in r.message for r in caplog.records)
    text = capsys.readouterr().out
    assert "1l2y.cif:A" in text and "mean" in text and "short P@L/5" in text
    rep = json.loads((out / "contacts.json").read_text())
    assert (
        rep["step"] == 0
        and rep["checkpoint"] == str(ckpt.absolute())
        and len(rep["config_hash"]) == 12
    )
    fit = rep["results"]["fit"]
    assert (
        fit["pairs"] == (129 - 6) * (129 - 5) // 2
        and fit["contacts"] > 100
        and fit["saved_to"] == str(save)
    )
    assert (
        rep["results"]["structures"][0]["precision"]["long"]["P@L"] is None
    )  # 20 residues: no long range
    assert (out / "contacts_1aki_A.png").stat().st_size > 10_000
    # The fitted head is in the saved checkpoint, which load_model restores with its provenance.
    fitted, step = checkpoint.load_model(save)
    cfg = checkpoint.open(save).config
    assert (
        step == 0
        and cfg["source"]["checkpoint"] == str(ckpt.absolute())
        and cfg["contact_regression"]["C"] == 1.0
    )
    w = np.asarray(fitted.contact_head.regression.kernel[...])
    w0 = np.asarray(checkpoint.load_model(ckpt)[0].contact_head.regression.kernel[...])
    assert w.shape == (8, 1) and not np.allclose(w, w0)
    # Fitting on 1AKI raises its own precision above the random head's (a sanity check of the fit).
    chain = read_chain(aki)
    before = ct.evaluate_map(ct.predict_contacts(engine8, chain), chain.contact_map())
    after = rep["results"]["structures"][1]["precision"]
    assert (
        after["short"]["P@L"] > before["short"]["P@L"]
        and after["long"]["P@L"] > before["long"]["P@L"]
    )
    # A structure with no contact at separation >= 6 cannot train the head; an unparsable one is one
    # clear line.
    assert (
        cli(
            [
                "evaluate",
                "contacts",
                "--checkpoint",
                str(ckpt),
                "--structures",
                aki,
                "--fit",
                str(s / "alphafold" / "glucagon.pdb"),
                "--save",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "both contacts and non-contacts" in capsys.readouterr().err
    bad = tmp_path / "x.cif"
    bad.write_text("data_x\nloop_\n_atom_site.id\n1 2 3\n")
    assert cli(["evaluate", "contacts", "--checkpoint", str(ckpt), "--structures", str(bad)]) == 2
    assert "x.cif: cannot parse as mmCIF" in capsys.readouterr().err
