"""Structure scores (biotite): lDDT against the SWISS-MODEL server's values for 1L2Y, TM-scores
against USalign's (biotite's ``tm_scores.json``), residue alignment when numbering differs, the
pLDDT
calibration, and the command (matching by name or TSV, bad input)."""

import json

import biotite.structure.io.pdb as pdb
import numpy as np
import pytest

from esmjax.cli import main as cli
from esmjax.evaluate import structure_scores as ss

# SHARED/SOURCES.md: 1L2Y model-k vs model-1 lDDT from the SWISS-MODEL server, heavy atoms.
SWISS_MODEL_LDDT = [1.00, 0.86, 0.83, 0.85, 0.88, 0.85, 0.81, 0.89]


def _write_model(src, model, path, b_factor=None, drop_first=0):
    f = pdb.PDBFile.read(str(src))
    atoms = f.get_structure(model=model, extra_fields=["b_factor"])
    atoms = atoms[atoms.element != "H"]
    if drop_first:
        first = np.unique(atoms.res_id)[drop_first]
        atoms = atoms[atoms.res_id >= first]
        atoms.res_id = atoms.res_id + 100  # different numbering
    if b_factor is not None:
        atoms.b_factor = b_factor(atoms)
    out = pdb.PDBFile()
    out.set_structure(atoms)
    out.write(str(path))
    return path


@pytest.fixture(scope="module")
def bio(shared_data):
    return shared_data / "structures" / "biotite"


def test_lddt_matches_swiss_model(bio, tmp_path):
    ref = bio / "1l2y.pdb"
    for k, want in enumerate(SWISS_MODEL_LDDT, 1):
        r = ss.score_pair(str(_write_model(ref, k, tmp_path / f"m{k}.pdb")), str(ref))
        assert r["lddt"] == pytest.approx(want, abs=1e-2), k
        assert r["coverage"] == 1.0 and r["reference_length"] == 20
    assert r["lddt_ca"] > r["lddt"] - 0.2 and r["rmsd_ca"] > 0.1


def test_tm_score_against_usalign(bio, tmp_path):
    """US-align -se scores the coordinates as given: ``tm_score`` reproduces every model of both
    NMR ensembles to 1e-4; the superposition search includes the given coordinates, so its
    TM-score is never below that."""
    import biotite.structure as struc

    ref_scores = json.loads((bio / "tm_scores.json").read_text())
    for pdb_id in ("1l2y", "1gya"):
        src = bio / f"{pdb_id}.pdb"
        stack = pdb.PDBFile.read(str(src)).get_structure()
        ca = stack[:, (stack.atom_name == "CA") & struc.filter_amino_acids(stack)]
        n = ca.shape[1]
        for k in range(2, len(ref_scores[pdb_id]) + 1):
            want = ref_scores[pdb_id][k - 1]
            as_given = ss.tm_score(np.linalg.norm(ca[k - 1].coord - ca[0].coord, axis=1), n)
            assert as_given == pytest.approx(want, abs=1e-4), (pdb_id, k)
            if k <= 4:
                got = ss.search_superpositions(ca[0], ca[k - 1].coord, n)["tm_score"]
                assert as_given - 1e-6 <= got <= 1.0 and got == pytest.approx(want, abs=0.05)
        if pdb_id == "1l2y":  # through the whole pipeline, on files
            p = _write_model(src, 2, tmp_path / "m2.pdb")
            r = ss.score_pair(str(p), str(src))
            assert ref_scores[pdb_id][1] - 1e-6 <= r["tm_score"] <= 1.0
            assert 0.5 < r["gdt_ts"] <= 1.0
    same = ss.score_pair(str(bio / "1aki.cif"), str(bio / "1aki.pdb"))
    assert same["tm_score"] == pytest.approx(1.0) and same["gdt_ts"] == 1.0
    assert same["lddt"] == 1.0 and same["rmsd_ca"] < 1e-3


def test_alignment_coverage_and_plddt(bio, tmp_path):
    ref = bio / "1l2y.pdb"
    full = ss.score_pair(str(_write_model(ref, 3, tmp_path / "full.pdb")), str(ref))
    # the prediction lacks 3 N-terminal residues and is numbered from 104
    cut = ss.score_pair(str(_write_model(ref, 3, tmp_path / "cut.pdb", drop_first=3)), str(ref))
    assert cut["aligned_residues"] == 17 and cut["coverage"] == pytest.approx(17 / 20)
    assert cut["predicted_length"] == 17 and cut["sequence_identity"] == 1.0
    lddt_full = np.array(full["per_residue"]["lddt_ca"])
    assert len(cut["per_residue"]["lddt_ca"]) == 17
    assert cut["tm_score"] < full["tm_score"]  # normalised by the full reference length
    # pLDDT from the B-factor column: 100 x the residue's CA lDDT -> correlation 1
    per_res = dict(zip(range(1, 21), lddt_full))

    def bf(atoms):
        return np.array([100 * per_res[r] for r in atoms.res_id], np.float32)

    p = _write_model(ref, 3, tmp_path / "pred.pdb", b_factor=bf)
    r = ss.score_pair(str(p), str(ref))
    assert r["plddt_source"] == "b_factor" and r["plddt_lddt_pearson"] == pytest.approx(1, abs=1e-3)
    # an `esmfold` JSON next to the PDB takes precedence
    plddt = np.linspace(20, 90, 20)
    p.with_suffix(".json").write_text(json.dumps({"plddt": plddt.tolist()}))
    r = ss.score_pair(str(p), str(ref))
    assert r["plddt_source"] == "json" and r["mean_plddt"] == pytest.approx(plddt.mean())
    want = np.corrcoef(plddt, lddt_full)[0, 1]
    assert r["plddt_lddt_pearson"] == pytest.approx(want, abs=1e-6)


def test_command(bio, tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    _write_model(bio / "1l2y.pdb", 2, pred / "1l2y.pdb")
    _write_model(bio / "1aki.pdb", 1, pred / "1aki.pdb")
    for name in ("1l2y.cif", "1aki.cif"):
        (ref / name).write_bytes((bio / name).read_bytes())
    out = tmp_path / "out"
    rc = cli(
        ["evaluate", "structures", "--predicted", str(pred), "--reference", str(ref)]
        + ["--out", str(out), "--plot", "--no-progress"]
    )
    assert rc == 0
    rep = json.loads((out / "structures.json").read_text())["results"]
    assert rep["targets"] == 2
    by = {t["reference"]: t for t in rep["per_target"]}
    assert by["1aki.cif:A"]["lddt"] == 1.0
    assert by["1l2y.cif:A"]["lddt"] == pytest.approx(SWISS_MODEL_LDDT[1], abs=1e-2)
    assert rep["mean"]["lddt"] == pytest.approx(np.mean([t["lddt"] for t in rep["per_target"]]))
    assert len((out / "structures.csv").read_text().splitlines()) == 3
    assert (out / "structures_lddt_hist.png").is_file()
    assert (out / "structures_plddt_vs_lddt.png").is_file()
    assert "1l2y.pdb:A" in capsys.readouterr().out
    # explicit pairs with a chain, relative to the TSV
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("# predicted\treference\npred/1l2y.pdb\tref/1l2y.cif:A\n")
    assert cli(["evaluate", "structures", "--pairs", str(tsv), "--out", str(out / "t")]) == 0
    # bad input: a prediction with no reference, a malformed TSV, a missing chain
    (pred / "9xyz.pdb").write_bytes((pred / "1aki.pdb").read_bytes())
    rc = cli(
        ["evaluate", "structures", "--predicted", str(pred), "--reference", str(ref)]
        + ["--out", str(out)]
    )
    assert rc == 2 and "no reference structure with the name of 9xyz.pdb" in capsys.readouterr().err
    tsv.write_text("pred/1l2y.pdb ref/1l2y.cif\n")
    assert cli(["evaluate", "structures", "--pairs", str(tsv), "--out", str(out)]) == 2
    assert "pairs.tsv:1: expected" in capsys.readouterr().err
    tsv.write_text("pred/1l2y.pdb\tref/1l2y.cif:Q\n")
    assert cli(["evaluate", "structures", "--pairs", str(tsv), "--out", str(out)]) == 2
    assert "no protein chain 'Q'" in capsys.readouterr().err
