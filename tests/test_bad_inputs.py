"""The bad-input corpus (issue 28): every user mistake is exactly one ``esmjax CMD: error: ...``
line on stderr and exit code 2, never a traceback, and it comes before the work it would spoil.

``CASES`` is the table: (id, argv, expected exit code, a phrase of the line, flags). It holds
issue 28's items 8-14 (outputs and binary inputs, long ``--wt-sequence``, damaged or foreign
steps named explicitly, a workdir of the other kind, optional packages and outputs checked before
``--fit`` and ``evaluate all``, a copied run's data, label files without ``SET=``) and a
representative set of mistakes that behaved already (tests/test_cli_errors.py holds the config
and mesh cases, and the order of checks and start-up in a fresh process; not repeated here).

Each row runs the CLI in-process in a shared folder of small inputs (``ws``): a tiny converted
checkpoint, copies with a damaged and a foreign step 30, weightless pretraining and fine-tuning
workdirs (their ``config.json`` is all the checks read), a file where folders go, a binary file.
Flags: ``early`` rows fail before any device work: stderr is the error line alone and nothing was
logged, not even the start-up's INFO line (the real stderr is then that one line); ``late`` rows
fail after the start-up (the INFO and WARNING lines before the error line are allowed);
``nompl`` hides matplotlib; ``absent=PATH`` names a path the failed command must not have
created. Items 12 (a rerun reuses its fit), 13 (paths stored absolute), 15 (lower case) and 17
(``--help``) have their own tests below.
"""

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import ESM2_PRESETS, FinetuneConfig, TrainConfig, from_dict, to_dict
from esmjax.io import checkpoint
from esmjax.models.esm2 import ESM2

ROOT = Path(__file__).resolve().parents[1]
# A literal wild-type sequence longer than a file name may be (255 bytes): TEM-1 has 286 residues.
LONG_WT = "MSIQHFRVALIPFFAAFCLPVFA" * 13  # 299 residues, S at position 2


def _garble(step: Path) -> None:
    """Overwrites the array data of a checkpoint step (the files under its ``d/`` folders)."""
    for f in step.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"not a chunk")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, shared_data, ckpt):
    d = tmp_path_factory.mktemp("bad_inputs")
    tiny = ESM2_PRESETS["tiny"]
    shutil.copytree(ckpt, d / "tiny")
    shutil.copytree(d / "tiny", d / "dmg")  # step 30: committed, its arrays garbled
    shutil.copytree(d / "tiny" / "checkpoints" / "0", d / "dmg" / "checkpoints" / "30")
    _garble(d / "dmg" / "checkpoints" / "30")
    other = from_dict(type(tiny), {**to_dict(tiny), "num_layers": 1})  # step 30 of another model
    one = ESM2(other, rngs=nnx.Rngs(1))
    checkpoint.save_converted(d / "other", other, checkpoint.params_numpy(one))
    shutil.copytree(d / "tiny", d / "foreign")
    shutil.copytree(d / "other" / "checkpoints" / "0", d / "foreign" / "checkpoints" / "30")
    # A pretraining run started elsewhere: its data path is relative to that folder (item 13).
    (d / "pt").mkdir()
    run = from_dict(TrainConfig, {"model": "tiny", "data": {"train": "runs/data/cath_s20"}})
    (d / "pt" / "config.json").write_text(json.dumps(to_dict(run)))
    shutil.copytree(d / "tiny" / "checkpoints", d / "pt" / "checkpoints")
    (d / "pt" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n')
    (d / "ft").mkdir()  # a fine-tuning run (sequence classification)
    ft = from_dict(FinetuneConfig, {"backbone": str(d / "tiny")})
    (d / "ft" / "config.json").write_text(
        json.dumps(
            {
                "model": to_dict(tiny),
                "finetune": to_dict(ft),
                "labels": ["a", "b"],
                "num_outputs": 2,
            }
        )
    )
    (d / "esmfold").mkdir()  # weightless: the checks read config.json only
    (d / "esmfold" / "config.json").write_text(
        json.dumps({"model": {"preset": "tiny"}, "esmfold": {}})
    )
    (d / "x.fa").write_text(">a\nMKTAYIAKQR\n")
    (d / "afile").write_text("a file where a folder or a file's folder goes\n")
    (d / "bin.dat").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16)
    (d / "out.csv").mkdir()
    (d / "notafit").mkdir()
    (d / "notafit" / "notes.txt").write_text("not a contact-head fit\n")
    (d / "dms.csv").write_text("mutant,score\nA2G,0.5\n")
    (d / "tr.yaml").write_text(
        json.dumps({"model": "tiny", "data": {"train": str(ROOT / "data" / "cath_s20.fa.gz")}})
    )
    (d / "ft.csv").write_text("sequence,target,set\nMKTAYIAK,a,train\nMKTAYIAR,b,test\n")
    (d / "ft_blank.csv").write_text("sequence,target,set\nMKTAYIAK,a,train\nMKTAYIAR,b,\n")
    (d / "ft.yaml").write_text(json.dumps({"backbone": "tiny", "data": {"csv": "ft.csv"}}))
    (d / "ft_blank.yaml").write_text(
        json.dumps({"backbone": "tiny", "data": {"csv": "ft_blank.csv"}})
    )
    (d / "res.fa").write_text(">p1\nMKTAYIAK\n>p2\nMKTAYIAR\n>p3\nMKTAY\n")
    (d / "res_labels.fa").write_text(
        ">p1 SET=train\nHHHHCCCC\n>p2\nCCCCHHHH\n>p3 SET=test\nHHCCC\n"
    )
    (d / "res.yaml").write_text(
        json.dumps(
            {
                "backbone": "tiny",
                "task": "residue_classification",
                "data": {"fasta": "res.fa", "labels": "res_labels.fa"},
            }
        )
    )
    s = shared_data / "structures" / "biotite"
    (d / "fit_suite.yaml").write_text(
        json.dumps(
            {
                "perplexity": {"data": str(d / "x.fa")},
                "contacts": {"fit": [str(s / "1aki.pdb")], "structures": [str(s / "1l2y.cif")]},
            }
        )
    )
    return d


def unwritable() -> str:
    """A folder this process cannot write in: read-only bits, except for root, who passes them
    (and ``os.access``); sysfs refuses root a new file."""
    if os.geteuid() == 0:
        return "/sys/esmjax-out"
    ro = Path("ro")
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return str(ro / "out")


def _s(name: str) -> str:
    from support.shared_paths import SHARED

    return str(SHARED / "structures" / "biotite" / name)


# (id, argv, exit code, phrase of the error line, flags: early / late, nompl, absent=PATH)
CASES = [
    # ---- item 8: outputs checked before any compute (each was a traceback, predict's after 23 s)
    ("train_workdir_file", ["train", "--config", "tr.yaml", "--workdir", "afile"], 2,
     "--workdir afile: exists and is not a folder", "early"),
    ("train_workdir_under_file", ["train", "--config", "tr.yaml", "--workdir", "afile/w"], 2,
     "afile is a file, not a folder", "early"),
    ("finetune_workdir_file", ["finetune", "--config", "ft.yaml", "--workdir", "afile"], 2,
     "--workdir afile: exists and is not a folder", "early"),
    ("embed_out_file", ["embed", "--checkpoint", "tiny", "--fasta", "x.fa", "--out", "afile"], 2,
     "--out afile: exists and is not a folder", "early"),
    ("embed_out_unwritable", ["embed", "--checkpoint", "tiny", "--fasta", "x.fa", "--out", "RO"],
     2, "cannot write in", "early"),
    ("fold_out_file", ["fold", "--checkpoint", "esmfold", "--fasta", "x.fa", "--out", "afile"], 2,
     "--out afile: exists and is not a folder", "early"),
    ("perplexity_out_file",
     ["evaluate", "perplexity", "--checkpoint", "tiny", "--data", "x.fa", "--out", "afile"], 2,
     "--out afile: exists and is not a folder", "early"),
    ("contacts_out_file", ["evaluate", "contacts", "--checkpoint", "tiny", "--structures",
                           "S/1l2y.cif", "--out", "afile"], 2, "--out afile: exists", "early"),
    ("contacts_save_under_file", ["evaluate", "contacts", "--checkpoint", "tiny", "--structures",
                                  "S/1l2y.cif", "--fit", "S/1aki.pdb", "--save", "afile/fit"], 2,
     "--save afile/fit: ", "early"),
    ("variants_out_file", ["evaluate", "variants", "--checkpoint", "tiny", "--dms", "dms.csv",
                           "--out", "afile"], 2, "--out afile: exists", "early"),
    ("proteingym_out_file", ["evaluate", "proteingym", "--checkpoint", "tiny", "--folder", ".",
                             "--out", "afile"], 2, "--out afile: exists", "early"),
    ("structures_out_file", ["evaluate", "structures", "--pairs", "x.fa", "--out", "afile"], 2,
     "--out afile: exists", "early"),
    ("all_out_file", ["evaluate", "all", "--checkpoint", "tiny", "--suite", "fit_suite.yaml",
                      "--out", "afile"], 2, "--out afile: exists", "early"),
    ("compare_out_under_file", ["evaluate", "compare", "pt", "--out", "afile/t.md"], 2,
     "afile is a file, not a folder", "early"),
    ("predict_out_under_file",
     ["predict", "--checkpoint", "ft", "--fasta", "x.fa", "--out", "afile/p.csv"], 2,
     "--out afile/p.csv: ", "early"),
    ("predict_out_folder",
     ["predict", "--checkpoint", "ft", "--fasta", "x.fa", "--out", "out.csv"], 2,
     "--out out.csv: is a folder, not a file name", "early"),
    ("predict_out_format",
     ["predict", "--checkpoint", "ft", "--fasta", "x.fa", "--out", "p.jsonl"], 2,
     "--out p.jsonl: residue tasks write .jsonl, sequence tasks .csv", "early"),
    ("plot_out_under_file", ["plot", "pt", "--out", "afile/t.png"], 2,
     "afile is a file, not a folder", "early"),
    ("plot_out_folder", ["plot", "pt", "--out", "pt"], 2, "--out pt: is a folder", "early"),
    ("export_out_under_file", ["export", "tiny", "afile/x.pt", "--to", "fair-esm"], 2,
     "afile is a file, not a folder", "early"),
    ("convert_out_under_file", ["convert", "tiny", "afile/x"], 2,
     "afile is a file, not a folder", "early"),
    ("data_build_out_under_file", ["data", "build", "--fasta", "x.fa", "--out", "afile/ds"], 2,
     "afile is a file, not a folder", "early"),
    # ---- item 8: a binary file where text goes (each was a UnicodeDecodeError traceback)
    ("structures_pairs_binary", ["evaluate", "structures", "--pairs", "bin.dat", "--out", "r"], 2,
     "bin.dat: not a text file", "early absent=r"),
    ("compare_binary", ["evaluate", "compare", "bin.dat"], 2, "bin.dat: not a text file", "early"),
    ("dms_binary", ["evaluate", "variants", "--checkpoint", "tiny", "--dms", "bin.dat",
                    "--wt-sequence", "MKT"], 2, "bin.dat: not a text file, expected a CSV", ""),
    ("convert_esmjax_folder", ["convert", "tiny", "conv"], 2,
     "tiny is already an esmjax checkpoint or run", "absent=conv"),
    ("plot_binary", ["plot", "bin.dat", "--out", "t.png"], 2, "bin.dat: not a text file",
     "early"),
    ("suite_binary", ["evaluate", "all", "--checkpoint", "tiny", "--suite", "bin.dat"], 2,
     "bin.dat: not a text file, expected a suite YAML", "early"),
    # ---- item 8: a literal --wt-sequence longer than a file name (was OSError File name too long):
    # read as the sequence, so the scan's mismatch at position 2 is the line
    ("wt_sequence_long", ["evaluate", "variants", "--checkpoint", "tiny", "--dms", "dms.csv",
                          "--wt-sequence", LONG_WT], 2,
     "dms.csv:2: mutant A2G: wild-type residue A does not match S at position 2", "early"),
    # ---- item 9: a damaged or foreign step named explicitly (were ~150-line tracebacks)
    ("perplexity_damaged_step", ["evaluate", "perplexity", "--checkpoint", "dmg", "--step", "30",
                                 "--data", "x.fa", "--no-progress"], 2,
     "step 30 is unreadable", "late absent=dmg/eval"),
    ("embed_damaged_step", ["embed", "--checkpoint", "dmg", "--step", "30", "--fasta", "x.fa",
                            "--out", "e", "--no-progress"], 2, "step 30 is unreadable",
     "late absent=e"),
    ("embed_foreign_step", ["embed", "--checkpoint", "foreign", "--step", "30", "--fasta", "x.fa",
                            "--out", "e", "--no-progress"], 2, "step 30 is unreadable",
     "late absent=e"),
    # ---- item 10: a workdir of the other kind, named before any device work
    ("train_into_finetune_run", ["train", "--config", "tr.yaml", "--workdir", "ft"], 2,
     "--workdir ft holds a fine-tuning run, not a pretraining run", "early"),
    ("train_resume_finetune_run", ["train", "--workdir", "ft"], 2,
     "holds a fine-tuning run, not a pretraining run", "early"),
    ("train_into_checkpoint", ["train", "--config", "tr.yaml", "--workdir", "tiny"], 2,
     "holds a converted checkpoint, not a pretraining run", "early"),
    ("finetune_into_pretraining_run", ["finetune", "--config", "ft.yaml", "--workdir", "pt"], 2,
     "--workdir pt holds a pretraining run, not a fine-tuning run", "early"),
    ("finetune_resume_pretraining_run", ["finetune", "--workdir", "pt"], 2,
     "holds a pretraining run, not a fine-tuning run", "early"),
    ("predict_pretraining_run",
     ["predict", "--checkpoint", "pt", "--fasta", "x.fa", "--out", "p.csv"], 2,
     "--checkpoint pt holds a pretraining run, not a fine-tuning run", "early"),
    # ---- item 12: optional packages and outputs before the work (the fit was saved, then failed)
    ("contacts_fit_plot_no_matplotlib",
     ["evaluate", "contacts", "--checkpoint", "tiny", "--structures", "S/1l2y.cif", "--fit",
      "S/1aki.pdb", "--plot"], 2, "--plot needs matplotlib",
     "early nompl absent=tiny/contact_head"),
    ("all_fit_plot_no_matplotlib", ["evaluate", "all", "--checkpoint", "tiny", "--suite",
                                    "fit_suite.yaml", "--plot", "--out", "r"], 2,
     "--plot needs matplotlib", "early nompl absent=r"),
    ("plot_no_matplotlib", ["plot", "pt"], 2, "esmjax plot needs matplotlib", "early nompl"),
    ("contacts_save_not_a_fit",
     ["evaluate", "contacts", "--checkpoint", "tiny", "--step", "0", "--structures", "S/1l2y.cif",
      "--fit", "S/1aki.pdb", "--save", "notafit"], 2,
     "--save notafit: exists and holds no contact-head fit", "early"),
    # ---- item 13: a run's stored data path that is not there (a copied workdir)
    ("perplexity_moved_data", ["evaluate", "perplexity", "--checkpoint", "pt"], 2,
     "runs/data/cath_s20 (config.json data.train) is not there", "early"),
    # ---- item 14: a label FASTA record without SET= among marked ones (went to train silently)
    ("labels_without_set", ["finetune", "--config", "res.yaml", "--workdir", "w1"], 2,
     "res_labels.fa:3: unknown set: no SET= in the header (1 of 3 records have none",
     "late absent=w1"),
    ("csv_empty_set", ["finetune", "--config", "ft_blank.yaml", "--workdir", "w2"], 2,
     "ft_blank.csv:3: unknown set: ''", "late absent=w2"),
    # ---- mistakes that behaved already (a representative set)
    ("missing_step", ["evaluate", "perplexity", "--checkpoint", "tiny", "--step", "7", "--data",
                      "x.fa"], 2, "no step 7; available: [0]", "late"),
    ("layers_out_of_range", ["embed", "--checkpoint", "tiny", "--fasta", "x.fa", "--out", "e",
                             "--layers", "99"], 2, "--layers: 99 out of range", "late absent=e"),
    ("fold_esm2_checkpoint", ["fold", "--checkpoint", "tiny", "--fasta", "x.fa", "--out", "f"], 2,
     "an ESM-2 checkpoint, not ESMFold", "early absent=f"),
    ("variants_csv_without_wt", ["evaluate", "variants", "--checkpoint", "tiny", "--dms",
                                 "dms.csv"], 2, "a CSV scan needs --wt-sequence", "early"),
    ("wt_sequence_not_protein", ["evaluate", "variants", "--checkpoint", "tiny", "--dms",
                                 "dms.csv", "--wt-sequence", "MK1"], 2,
     "neither a file nor a protein sequence", "early"),
    ("no_suite", ["evaluate", "all", "--checkpoint", "tiny", "--suite", "no.yaml"], 2,
     "no.yaml: no such suite file", "early"),
    ("no_card", ["evaluate", "compare", "nothing"], 2, "nothing: no summary.json", "early"),
    ("no_metrics", ["plot", "nothing"], 2, "nothing: no such metrics file", "early"),
    ("predict_no_workdir", ["predict", "--checkpoint", "nothing", "--fasta", "x.fa", "--out",
                            "p.csv"], 2, "nothing: not an esmjax", "early"),
    ("perplexity_without_data", ["evaluate", "perplexity", "--checkpoint", "tiny"], 2,
     "tiny is not a training workdir: name the evaluation data with --data", "early"),
    ("structure_format", ["evaluate", "contacts", "--checkpoint", "tiny", "--structures",
                          "x.fa"], 2, "x.fa: unknown structure format", "early"),
    ("fit_c_without_fit", ["evaluate", "contacts", "--checkpoint", "tiny", "--structures",
                           "S/1l2y.cif", "--fit-c", "1"], 2,
     "--fit-c is only used with --fit", "early"),
    ("export_exists", ["export", "tiny", "afile", "--to", "fair-esm"], 2,
     "afile exists; refusing to overwrite", "early"),
    ("inspect_not_dataset", ["data", "inspect", "tiny"], 2, "not a dataset folder", "early"),
    ("embed_binary_fasta", ["embed", "--checkpoint", "tiny", "--fasta", "bin.dat", "--out", "e"],
     2, "bin.dat: binary content, not a FASTA file", "early absent=e"),
    ("train_binary_config", ["train", "--config", "bin.dat", "--workdir", "w3"], 2,
     "config file bin.dat: cannot be read", "early absent=w3"),
]  # fmt: skip


def _argv(argv: list[str], ws: Path) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("S/"):
            a = _s(a[2:])
        elif a == "RO":
            a = unwritable()
        out.append(a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(ws, case, capsys, caplog, monkeypatch):
    _, argv, code, phrase, flags = case
    flags = flags.split()
    monkeypatch.chdir(ws)
    if "nompl" in flags:  # as if matplotlib were not installed: its import raises ImportError
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    caplog.set_level(logging.INFO)  # as the CLI logs by default (ESMJAX_LOG=INFO)
    rc = cli(_argv(argv, ws))
    err = capsys.readouterr().err
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"esmjax {argv[0]}: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert phrase in lines[0], lines[0]
    if "early" in flags:  # nothing else printed or logged: no start-up, no model, no work
        assert err.strip().splitlines() == lines, err[-3000:]
        assert not caplog.records, caplog.text
    for f in flags:
        if f.startswith("absent="):
            assert not (ws / f[len("absent=") :]).exists(), f


# --------------------------------------------------------------------------------------------------
# Item 12: a rerun of `evaluate contacts --fit` evaluates with the fit it saved (it was refused
# because contact_head/step_N existed); another fit there is refused before the model loads, and
# in `evaluate all` before any section runs.
# --------------------------------------------------------------------------------------------------
def test_contacts_fit_rerun_reuses_the_fit(ws, tmp_path, capsys, monkeypatch):
    shutil.copytree(ws / "tiny", tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "contacts", "--checkpoint", "ck", "--no-progress", "--structures"]
    argv += [_s("1l2y.cif"), "--fit", _s("1aki.pdb")]
    assert cli([*argv, "--out", "r1"]) == 0
    saved = tmp_path / "ck" / "contact_head" / "step_0"
    stamp = (saved / "config.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli([*argv, "--out", "r2"]) == 0
    assert "the earlier fit in" in capsys.readouterr().out
    first, again = (json.loads((tmp_path / r / "contacts.json").read_text()) for r in ("r1", "r2"))
    assert again["results"]["fit"]["reused"] and (saved / "config.json").stat().st_mtime_ns == stamp
    assert again["results"]["structures"] == first["results"]["structures"]
    assert again["results"]["fit"]["C"] == first["results"]["fit"]["C"]
    # another C: refused before the model loads, in the command and in a suite
    rc = cli([*argv, "--fit-c", "1.0", "--out", "r3"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "(the default --save): holds a fit with another C" in line, line
    suite = json.loads((ws / "fit_suite.yaml").read_text())
    suite["contacts"]["fit_c"] = 1.0
    (tmp_path / "s.yaml").write_text(json.dumps(suite))
    rc = cli(["evaluate", "all", "--checkpoint", "ck", "--suite", "s.yaml", "--out", "r4"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "holds a fit with another C" in line, line
    assert not (tmp_path / "r4" / "perplexity.json").exists()  # the first section never ran


# --------------------------------------------------------------------------------------------------
# Item 15: lower-case residues read as upper case. The references give no usable answer: fair-esm
# refuses them (KeyError), HF's tokenizer turns a run of them into one <unk> (positions shift).
# --------------------------------------------------------------------------------------------------
def test_lowercase_residues_read_as_upper_case():
    from esmjax.models.alphabet import encode

    assert encode("MKtaYIAK").tolist() == encode("MKTAYIAK").tolist()
    esm = pytest.importorskip("esm")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with pytest.raises(KeyError):
        alphabet.get_batch_converter()([("x", "MKtaYIAK")])
    transformers = pytest.importorskip("transformers")
    vocab = Path(os.environ.get("TMPDIR", "/tmp")) / f"esm_vocab_{os.getpid()}.txt"
    vocab.write_text("\n".join(alphabet.all_toks))
    try:
        ids = transformers.EsmTokenizer(str(vocab))("MKtaYIAK")["input_ids"]
    finally:
        vocab.unlink()
    assert len(ids) == 2 + 7 and ids.count(alphabet.unk_idx) == 1  # 8 residues, 7 tokens


def test_long_literal_wt_sequence_is_a_sequence():
    from esmjax.evaluate.variants import read_wt_sequence

    assert read_wt_sequence(LONG_WT) == LONG_WT
    assert read_wt_sequence(LONG_WT.lower()) == LONG_WT


# --------------------------------------------------------------------------------------------------
# Item 17: the `%` of "top-10% recall" in a help string.
# --------------------------------------------------------------------------------------------------
def test_evaluate_help_prints_text(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "top-10% recall" in out and "option_strings" not in out, out


# --------------------------------------------------------------------------------------------------
# Item 13: a new run stores its data and backbone absolute, so a copied workdir still names them.
# --------------------------------------------------------------------------------------------------
def test_runs_store_absolute_paths(ws, monkeypatch):
    from esmjax.commands import finetune as ft_cmd
    from esmjax.commands import train as train_cmd
    from esmjax.config import load_finetune_config

    monkeypatch.chdir(ws)
    cfg = from_dict(TrainConfig, {"model": "tiny", "data": {"train": "runs/ds", "eval": "x.fa"}})
    cfg = train_cmd._stored_paths(cfg)
    assert cfg.data.train == str(ws / "runs" / "ds") and cfg.data.eval == str(ws / "x.fa")
    assert train_cmd._stored_paths(from_dict(TrainConfig, {"model": "tiny"})).init_from == ""
    ft = load_finetune_config(ws / "ft.yaml")
    new = ft_cmd._stored_paths(ft, "w_new")
    assert new.backbone == str(ws / "tiny") and new.data.csv == str(ws / "ft.csv")
    # a run saved before, with its backbone relative, keeps it: the resumed run compares them
    (ws / "w_old").mkdir()
    (ws / "w_old" / "config.json").write_text(json.dumps({"finetune": {"backbone": "./tiny"}}))
    assert ft_cmd._stored_paths(ft, "w_old").backbone == "./tiny"
