"""``evaluate all`` (a suite YAML -> every listed evaluation + one report card) and ``evaluate
compare`` on a tiny random checkpoint, with small data."""

import json
import shutil

import numpy as np
import pytest

from esmjax.cli import main as cli
from esmjax.evaluate import options as op


@pytest.fixture(scope="module")
def suite_dir(shared_data, tmp_path_factory):
    """A suite file with relative paths next to its data."""
    import biotite.structure.io.pdb as pdb

    d = tmp_path_factory.mktemp("suite_files")
    bio = shared_data / "structures" / "biotite"
    (d / "ref").mkdir()
    (d / "pred").mkdir()
    shutil.copy(bio / "1l2y.cif", d / "ref" / "1l2y.cif")
    atoms = pdb.PDBFile.read(str(bio / "1l2y.pdb")).get_structure(model=2)
    f = pdb.PDBFile()
    f.set_structure(atoms[atoms.element != "H"])
    f.write(str(d / "pred" / "1l2y.pdb"))
    lines = (shared_data / "esm_examples" / "P62593.fasta").read_text().splitlines()
    picked = [ln for k in range(30) for ln in lines[2 * 180 * k : 2 * 180 * k + 2]]
    (d / "scan.fasta").write_text("\n".join(picked) + "\n")
    seqs = (shared_data / "structures" / "structures_sequences.fasta").read_text()
    (d / "seqs.fasta").write_text(seqs)
    (d / "suite.yaml").write_text(
        "perplexity: {data: seqs.fasta, eval-tokens: 1024, seq_len: 128}\n"
        f"contacts: {{structures: [{bio / '1l2y.pdb'}]}}\n"
        "variants: {dms: scan.fasta}\n"
        "structures:\n  predicted: [pred]\n  reference: [ref]\n"
    )
    return d


def test_report_card_and_compare(ckpt, suite_dir, tmp_path, capsys):
    out = tmp_path / "card"
    args = ["evaluate", "all", "--checkpoint", str(ckpt), "--suite", str(suite_dir / "suite.yaml")]
    assert cli([*args, "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    card = json.loads((out / "summary.json").read_text())
    assert card["step"] == 0 and card["skipped"] == {}
    assert set(card["reports"]) == {"perplexity", "contacts", "variants", "structures"}
    m = card["metrics"]
    # every number on the card is the one in its evaluation's own report
    per = json.loads((out / "perplexity.json").read_text())["results"]["masked_lm"]
    assert m["perplexity/perplexity"] == per["perplexity"] and 1 < per["perplexity"] < 40
    var = json.loads((out / "variants.json").read_text())["results"]
    assert m["variants/spearman"] == var["spearman"] and m["variants/variants"] == 30
    con = json.loads((out / "contacts.json").read_text())["results"]["mean"]
    assert m["contacts/long P@L"] == con["long"]["P@L"]
    assert m["structures/lddt"] == pytest.approx(0.857, abs=1e-3)  # 1L2Y model 2 vs model 1
    md = (out / "summary.md").read_text()
    assert md.startswith("| metric | tiny@0 |") and "| structures/tm_score |" in md
    assert "| variants/spearman |" in text
    # compare: a second card side by side
    other = json.loads((out / "summary.json").read_text())
    other["checkpoint"], other["metrics"]["variants/spearman"] = "/x/other", 0.5
    other["metrics"]["proteingym/spearman"] = 0.25
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli(["evaluate", "compare", str(out), str(tmp_path / "other.json")]) == 0
    rows = {ln.split("|")[1].strip(): ln for ln in capsys.readouterr().out.splitlines()[2:]}
    cells = [c.strip() for c in rows["variants/spearman"].split("|")[2:4]]
    assert cells == [f"{var['spearman']:.4f}", "0.5000"]
    assert [c.strip() for c in rows["proteingym/spearman"].split("|")[2:4]] == ["-", "0.2500"]
    assert np.isfinite(m["structures/tm_score"])


def test_suite_errors(ckpt, suite_dir, tmp_path, capsys):
    def run(text):
        p = suite_dir / "bad.yaml"
        p.write_text(text)
        rc = cli(
            ["evaluate", "all", "--checkpoint", str(ckpt), "--suite", str(p)]
            + ["--out", str(tmp_path / "o"), "--no-progress"]
        )
        return rc, capsys.readouterr()

    rc, cap = run("speed: {}\n")
    assert rc == 2 and "bad.yaml: unknown evaluation 'speed'" in cap.err
    rc, cap = run("variants: {dms: scan.fasta, bogus: 1}\n")
    assert rc == 2 and "bad.yaml: variants: unrecognized arguments: --bogus 1" in cap.err
    rc, cap = run("variants: {}\n")
    assert rc == 2 and "variants: the following arguments are required: --dms" in cap.err
    # folding needs an ESMFold checkpoint: skipped and said so; nothing else listed -> empty card
    rc, cap = run("structures: {fasta: seqs.fasta, reference: [ref]}\n")
    assert rc == 0 and "skipped structures: folding needs an ESMFold checkpoint" in cap.out
    assert cli(["evaluate", "compare", str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    # values in the command line's words, each naming its section
    rc, cap = run("proteingym: {folder: scan.fasta, method: best}\n")
    assert rc == 2 and "proteingym: argument --method: invalid choice: 'best'" in cap.err
    rc, cap = run("perplexity: {rows: many}\n")
    assert rc == 2 and "perplexity: argument --rows: invalid int value: 'many'" in cap.err
    rc, cap = run("contacts: {structures: []}\n")
    assert rc == 2 and "contacts: argument --structures: expected at least one" in cap.err
    rc, cap = run("variants: {dms: [a, b]}\n")
    assert rc == 2 and "variants: argument --dms: expected one argument" in cap.err
    assert op.flags({"a_b": [1, 2], "c": True, "d": False, "e": "x"}) == [
        "--a-b",
        "1",
        "2",
        "--c",
        "--e",
        "x",
    ]


@pytest.mark.slow  # about 75 s on 2 CPU cores (ESMFold compilation)
def test_esmfold_card_folds_and_scores(shared_data, tmp_path, capsys):
    """An ESMFold checkpoint (random weights, HF folder -> esmjax convert): the suite folds the
    FASTA, scores the folds against the references, and skips the language-model evaluations."""
    pytest.importorskip("transformers")
    from support.esmfold_reference import hf_model

    hf_model("cli", 3, round_inv_freq=False).save_pretrained(tmp_path / "hf")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "fold_ckpt")]) == 0
    bio = shared_data / "structures" / "biotite"
    (tmp_path / "ref").mkdir()
    shutil.copy(bio / "1l2y.cif", tmp_path / "ref" / "1l2y.cif")
    (tmp_path / "t.fasta").write_text(">1l2y trp-cage\nNLYIQWLKDGGPSSGRPPPS\n")
    (tmp_path / "s.yaml").write_text(
        "perplexity: {data: t.fasta}\nstructures: {fasta: t.fasta, reference: [ref]}\n"
    )
    out = tmp_path / "card"
    args = ["evaluate", "all", "--checkpoint", str(tmp_path / "fold_ckpt")]
    assert (
        cli([*args, "--suite", str(tmp_path / "s.yaml"), "--out", str(out), "--no-progress"]) == 0
    )
    assert "skipped perplexity: language-model evaluations" in capsys.readouterr().out
    assert (out / "folds" / "1l2y.pdb").is_file() and (out / "folds" / "1l2y.json").is_file()
    card = json.loads((out / "summary.json").read_text())
    assert set(card["reports"]) == {"structures"}
    t = json.loads((out / "structures.json").read_text())["results"]["per_target"][0]
    assert t["coverage"] == 1.0 and t["plddt_source"] == "json"  # the fold's own pLDDT
    assert 0 <= card["metrics"]["structures/lddt"] <= 1
