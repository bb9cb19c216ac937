"""``esmjax fold``: buckets and compile count, batched equals one at a time, multimers (linker
hidden, chains lettered, residues numbered per chain), PDB/mmCIF that parse back with biotite, the
JSON outputs; and the CLI end to end on an HF folder written with ``save_pretrained``, against HF
at a configuration no other test uses."""

import json

import jax
import numpy as np
import pytest
import torch
from support.esmfold_reference import converted, hf_model, rel_err

from esmjax import cli
from esmjax.errors import InputError
from esmjax.inference.engine import Engine
from esmjax.inference.fold import encode, fold_records, load_records, make_batches
from esmjax.io.fasta import Record
from esmjax.models.geometry import residue_constants as rc

# Residue counts 5, 9, 14 -> bucket 16; the multimer (9 + 25 + 5 = 39) and 40 -> bucket 48.
RECORDS = [
    Record("r5", "", "MKTVA"),
    Record("r9", "", "GSHMKTAYI"),
    Record("r14", "", "AKRXQELLKTAYIA"),
    Record("dimer", "", "ACDEFGHIK:LMNPQ"),
    Record("r40", "", "MKTVRQERLKSIVRILERSKEPVSGAQLAEELSVSRQVIV"),
]


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    _, model = converted("small")
    folder = Engine(model)
    out = tmp_path_factory.mktemp("fold")
    results = fold_records(folder, RECORDS, out, max_tokens=2048, mmcif=True, progress=False)
    return folder, out, {r["id"]: r for r in results}


def test_one_compile_per_bucket(folded):
    folder, _, results = folded
    assert len(results) == 5
    assert folder.traces == 2
    batches = list(make_batches(RECORDS, max_tokens=2048))
    assert [b.aatype.shape for b in batches] == [(4, 16), (2, 48)]  # rows: powers of two


def test_batched_equals_one_at_a_time(folded, tmp_path):
    folder, _, results = folded
    single = fold_records(folder, [RECORDS[1]], tmp_path, max_tokens=16, progress=False)[
        0
    ]  # rows=1: one compile
    assert folder.traces == 3
    batched = results["r9"]
    np.testing.assert_allclose(single["plddt"], batched["plddt"], atol=2e-4)
    np.testing.assert_allclose(np.asarray(single["pae"]), np.asarray(batched["pae"]), atol=2e-4)
    assert abs(single["ptm"] - batched["ptm"]) < 1e-5


def test_fold_out_in_a_bucket(folded, tmp_path):
    """``fold --out gs://...`` (the GCS emulator, tests/support/gcs_emulator.py): the same files,
    byte for byte, as the local output (the shapes are compiled already)."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from support.gcs_emulator import BUCKET, running

    folder, out, _ = folded
    with running(tmp_path / "staged"):
        import gcsfs

        fold_records(folder, RECORDS[:3], f"gs://{BUCKET}/fold", 2048, mmcif=True, progress=False)
        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
        got = {n.removeprefix(f"{BUCKET}/fold/"): fs.cat_file(n) for n in fs.find(f"{BUCKET}/fold")}
    names = [f"{r.id}.{ext}" for r in RECORDS[:3] for ext in ("pdb", "cif", "json")]
    assert got == {n: (out / n).read_bytes() for n in names}


def test_multimer_encoding():
    enc = encode("ACD:EF")
    assert len(enc.aatype) == 3 + 25 + 2
    np.testing.assert_array_equal(enc.linker_mask, [1] * 3 + [0] * 25 + [1] * 2)
    np.testing.assert_array_equal(enc.chain_index, [0] * 28 + [1] * 2)
    # fair-esm: arange plus 512 per chain, the linker counting with the chain before it.
    np.testing.assert_array_equal(enc.residx, list(range(28)) + [512 + 28, 512 + 29])
    np.testing.assert_array_equal(enc.residue_number[enc.linker_mask > 0], [1, 2, 3, 1, 2])
    assert set(enc.aatype[3:28]) == {rc.RESTYPE_ORDER["G"]}
    assert encode("MKX").aatype[2] == rc.UNK and encode("MKU").aatype[2] == rc.UNK


def test_multimer_matches_reference_and_hides_linker(folded):
    """The multimer through HF with fair-esm's residue indices gives the coordinates we write."""
    from biotite.structure.io.pdb import PDBFile

    _, out, results = folded
    enc = encode(RECORDS[3].sequence)
    ref = hf_model("small")
    with torch.no_grad():
        want = ref(
            torch.from_numpy(enc.aatype[None].astype(np.int64)),
            position_ids=torch.from_numpy(enc.residx[None].astype(np.int64)),
        )
    from transformers.models.esm.openfold_utils.feats import atom14_to_atom37

    w37 = atom14_to_atom37(want["positions"][-1], want).numpy()[0][enc.linker_mask > 0]
    atoms = PDBFile.read(str(out / "dimer.pdb")).get_structure(model=1, extra_fields=["b_factor"])
    assert sorted(set(atoms.chain_id)) == ["A", "B"]
    a, b = atoms[atoms.chain_id == "A"], atoms[atoms.chain_id == "B"]
    assert sorted(set(a.res_id)) == list(range(1, 10)) and sorted(set(b.res_id)) == list(
        range(1, 6)
    )
    ca = atoms[atoms.atom_name == "CA"]
    assert len(ca) == 14  # no linker residue is written
    assert np.abs(ca.coord - w37[:, rc.ATOM_ORDER["CA"]]).max() < 1e-3 + 5e-4  # + PDB rounding
    r = results["dimer"]
    assert len(r["plddt"]) == 14 and np.asarray(r["pae"]).shape == (14, 14)
    assert "".join(rc.RESTYPE_3TO1[n] for n in ca.res_name) == "ACDEFGHIKLMNPQ"
    w_plddt = 100 * want["plddt"].numpy()[0][enc.linker_mask > 0][:, rc.ATOM_ORDER["CA"]]
    assert rel_err(r["plddt"], w_plddt) < 1e-4


def test_pdb_and_mmcif_parse_back(folded):
    from biotite.structure.io.pdb import PDBFile
    from biotite.structure.io.pdbx import CIFFile, get_structure

    _, out, results = folded
    r = results["r14"]
    atoms = PDBFile.read(str(out / "r14.pdb")).get_structure(model=1, extra_fields=["b_factor"])
    ca = atoms[atoms.atom_name == "CA"]
    # X (residue 4) has no atoms in the atom37 layout, so, as in fair-esm's PDBs, it is not written.
    assert list(ca.res_id) == [1, 2, 3] + list(range(5, 15)) and len(r["plddt"]) == 14
    np.testing.assert_allclose(ca.b_factor, np.delete(r["plddt"], 3), atol=0.006)
    assert atoms.array_length() == sum(
        int(rc.RESTYPE_ATOM37_MASK[rc.RESTYPE_ORDER.get(c, rc.UNK)].sum())
        for c in RECORDS[2].sequence
    )
    cif = get_structure(CIFFile.read(str(out / "r14.cif")), model=1)
    np.testing.assert_allclose(cif.coord, atoms.coord, atol=1e-3)
    assert list(cif.atom_name) == list(atoms.atom_name)


def test_json_outputs(folded):
    _, out, _ = folded
    r = json.loads((out / "r40.json").read_text())
    assert set(r) == {"id", "sequence", "plddt", "mean_plddt", "ptm", "pae", "max_pae"}
    assert r["sequence"] == RECORDS[4].sequence and len(r["plddt"]) == 40
    assert np.asarray(r["pae"]).shape == (40, 40) and r["max_pae"] == 31.75
    assert 0 <= np.min(r["pae"]) and np.max(r["pae"]) <= 31.75 and 0 < r["ptm"] < 1
    assert 0 < r["mean_plddt"] < 100


def test_fasta_errors(tmp_path):
    fa = tmp_path / "bad.fasta"
    fa.write_text(">a\nMKT::AA\n")
    with pytest.raises(InputError, match="empty chain"):
        load_records(str(fa), False, 100)
    fa.write_text(">a\nMKTAA\n>a\nMKT\n")
    with pytest.raises(InputError, match="collides"):
        load_records(str(fa), False, 100)
    fa.write_text(">a\nMKTAA:" + "A" * 80 + "\n")
    with pytest.raises(InputError, match="max-length"):
        load_records(str(fa), False, 100)


def test_cli_convert_and_fold_match_hf(tmp_path):
    """The 'done when' scenario: an HF folder of an unseen configuration -> esmjax convert ->
    esmjax fold."""
    from biotite.structure.io.pdb import PDBFile
    from transformers.models.esm.openfold_utils import compute_tm

    ref = hf_model("cli", 3, round_inv_freq=False)
    ref.save_pretrained(tmp_path / "hf")  # safetensors
    seqs = {
        "p17": "MKTVRQERLKSIVRILE",
        "p21": "GSHMAKRXQELLKTAYIAWCD",
        "p24": "MKTVAAGDEHIKLMNPQRSTWYVA",
    }
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k} test\n{v}\n" for k, v in seqs.items()))
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    rc_ = cli.main(
        [
            "fold",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--fasta",
            str(fasta),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc_ == 0
    with torch.no_grad():
        want = ref.infer(list(seqs.values()))  # one padded batch of 3
    ca = rc.ATOM_ORDER["CA"]
    for i, (name, seq) in enumerate(seqs.items()):
        n = len(seq)
        atoms = PDBFile.read(str(tmp_path / "out" / f"{name}.pdb")).get_structure(model=1)
        got_ca = atoms[atoms.atom_name == "CA"].coord
        written = np.array([c != "X" for c in seq])  # X has no atoms, so no line in the PDB
        w_ca = want["positions"][-1, i, :n, 1].numpy()[written]
        assert np.abs(got_ca - w_ca).max() < 1e-3, name  # PDB keeps 3 decimals
        r = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert rel_err(r["plddt"], 100 * want["plddt"][i, :n, ca].numpy()) < 1e-4
        assert rel_err(r["pae"], want["predicted_aligned_error"][i, :n, :n].numpy()) < 1e-4
        w_ptm = compute_tm(want["ptm_logits"][i : i + 1, :n, :n], max_bin=31, no_bins=64).item()
        assert abs(r["ptm"] - w_ptm) < 1e-4 * w_ptm + 1e-6
    jax.clear_caches()
