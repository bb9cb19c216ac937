"""Fine-tuning: LoRA identities, the labelled-data readers' errors, and ``esmjax finetune`` end to
end for each task and mode on small real data (SCOPe class, TEM-1 DMS, a FLIP-layout residue
task)."""

import contextlib
import csv
import io
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import FinetuneDataConfig, esm2_preset
from esmjax.inference.engine import Engine
from esmjax.inference.task import load_finetuned, predict, split_tree
from esmjax.io import labeled
from esmjax.models.alphabet import batch_encode, encode_with_specials
from esmjax.models.heads import TaskModel, merge_lora

CFG = esm2_preset("tiny")
TOKENS = np.array([[0, 5, 6, 7, 8, 9, 10, 2, 1, 1], [0, 11, 12, 13, 2, 1, 1, 1, 1, 1]], np.int32)


_fwd = nnx.jit(lambda m, t: m(t))


def _model(lora, seed=0):
    return TaskModel(CFG, per_residue=False, num_outputs=3, lora=lora, rngs=nnx.Rngs(seed))


def test_lora_with_zero_b_is_the_backbone_and_merging_is_exact():
    plain = _model(None)
    adapted = _model((4, 8.0, ("q", "k", "v", "out", "fc1", "fc2")))
    pv = nnx.state(plain).to_pure_dict()
    av = nnx.state(adapted).to_pure_dict()
    lora, _ = split_tree(av, lambda names: "lora" in names)
    nnx.update(adapted, nnx.State(jax.tree.map(lambda x: x, {**pv})))  # same backbone and head
    nnx.update(adapted, nnx.State(lora))
    assert np.array_equal(
        np.asarray(_fwd(adapted, TOKENS)), np.asarray(_fwd(plain, TOKENS))
    )  # B = 0: exact

    # trained adapters: random B; the merged plain model equals the unmerged one within 1e-5
    key = jax.random.PRNGKey(1)
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.3 * jax.random.normal(jax.random.fold_in(key, hash(str(p)) % 2**31), x.shape)
            if str(p[-1]).find("lora_b") >= 0
            else x
        ),
        nnx.state(adapted).to_pure_dict(),
    )
    nnx.update(adapted, nnx.State(trained))
    unmerged = np.asarray(_fwd(adapted, TOKENS))
    assert np.abs(unmerged - np.asarray(_fwd(plain, TOKENS))).max() > 1e-3  # the adapters matter
    nnx.update(plain, nnx.State(merge_lora(trained, 8.0 / 4)))
    np.testing.assert_allclose(np.asarray(_fwd(plain, TOKENS)), unmerged, atol=1e-5, rtol=1e-5)


def _one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("sequence,target\nMKTAYIAK,1.5\nMKT,abc\n", "non-numeric target"),
        ("sequence,target\nMKTAYIAK,1.5\nMK*T,2\n", "invalid residue"),
    ],
)
def test_bad_csv_rows_name_file_and_line(tmp_path, content, fragment):
    p = tmp_path / "x.csv"
    p.write_text(content)
    cfg = FinetuneDataConfig(csv=str(p))
    with pytest.raises(labeled.LabeledDataError, match=rf"x\.csv:3: {fragment}"):
        labeled.load(cfg, "sequence_regression")
    splits, skipped = labeled.load(
        FinetuneDataConfig(csv=str(p), skip_invalid=True, valid_fraction=0), "sequence_regression"
    )
    assert len(splits["train"]) == 1 and sum(skipped.values()) == 1


def test_residue_label_length_mismatch_is_one_line_error(tmp_path, files, capsys):
    bad = tmp_path / "labels.fa"
    bad.write_text(">x SET=train VALIDATION=False\nHHC\n")
    (tmp_path / "s.fa").write_text(">x\nMKTA\n")
    rc = cli(
        [
            "finetune",
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            f"backbone={files / 'bb'}",
            "--set",
            "task=residue_classification",
            "--set",
            f"data.fasta={tmp_path / 's.fa'}",
            "--set",
            f"data.labels={bad}",
            "--config",
            str(_write(tmp_path / "c.yaml", {})),
        ]
    )
    line = _one_error(capsys)
    assert rc == 2 and "labels.fa:1: length mismatch: 3 labels for 4 residues" in line


def _write(path, cfg):
    path.write_text(json.dumps(cfg))
    return path


def finetune_run(tmp_path, files, name, cfg):
    base = {
        "backbone": str(files / "bb"),
        "optim": {"peak_lr": 3e-3, "warmup_steps": 2},
        "num_steps": 8,
        "log_every": 4,
        "eval_every": 4,
        "checkpoint": {"every": 4},
    }
    for k, v in cfg.items():
        base[k] = {**base[k], **v} if isinstance(base.get(k), dict) else v
    w = tmp_path / name
    args = ["finetune", "--config", str(_write(tmp_path / f"{name}.yaml", base))]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli([*args, "--workdir", str(w), "--no-progress"]) == 0
    return w, json.loads((w / "report.json").read_text()), buf.getvalue()


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, files):
    return finetune_run(
        tmp_path_factory.mktemp("cls"),
        files,
        "cls",
        {
            "mode": "lora",
            "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v", "fc2"]},
            "data": {"csv": str(files / "scope.csv"), "max_length": 30, "batch_size": 16},
        },
    )


def test_export_to_a_bucket_equals_the_local_export(cls_run, tmp_path, monkeypatch):
    """``export --to hf|peft|fair-esm`` of a fine-tuning run into a gs:// bucket (the GCS emulator,
    tests/support/gcs_emulator.py): the same files, byte for byte, as the local export."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    import functools

    from support.gcs_emulator import BUCKET, running

    from esmjax.inference import export

    # the run is restored once for the six exports (each restore costs seconds on a loaded core)
    monkeypatch.setattr(export, "load_finetuned", functools.cache(export.load_finetuned))
    w = cls_run[0]
    outs = {"hf": "hf", "peft": "ad", "fair-esm": "pt/esm2_t2_merged.pt"}
    with running(tmp_path / "staged"):
        import gcsfs

        for to, name in outs.items():
            assert cli(["export", str(w), "--to", to, f"gs://{BUCKET}/ft/{name}"]) == 0
            assert cli(["export", str(w), "--to", to, str(tmp_path / "local" / name)]) == 0
        fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
        got = {n.removeprefix(f"{BUCKET}/ft/"): fs.cat_file(n) for n in fs.find(f"{BUCKET}/ft")}
    local = tmp_path / "local"
    want = {
        p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()
    }
    assert got == want
    assert {"hf/config.json", "ad/adapter_config.json", "pt/esm2_t2_merged.pt"} <= set(got)


def test_sequence_classification_lora_stores_only_adapters_and_head(cls_run):
    w, rep, out = cls_run
    assert "trainable parameters stored per checkpoint" in out and "test (step" in out
    assert rep["labels"] == ["a", "b", "c", "d"] and 0 <= rep["test_accuracy"] <= 1
    assert {"test_macro_f1", "test_mcc", "baseline_test_accuracy"} <= set(rep)
    # the stored params: adapters and head only, nothing of the backbone's weights
    stored = ocp.StandardCheckpointer().metadata(w / "checkpoints" / "8" / "params")
    tree = getattr(stored, "item_metadata", stored)
    leaves = [
        "/".join(map(str, (getattr(k, "key", k) for k in p)))
        for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]
    assert leaves and all(x.startswith("classifier") or "/lora/" in x for x in leaves), leaves
    assert any("fc2/lora/lora_b" in x for x in leaves)
    lines = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_accuracy" in x for x in lines) and any("test_accuracy" in x for x in lines)
    assert (w / "best" / "checkpoints").exists()


def _hf_logits(folder, tokens, token_level):
    import torch
    from transformers import EsmForSequenceClassification, EsmForTokenClassification

    cls = EsmForTokenClassification if token_level else EsmForSequenceClassification
    model = cls.from_pretrained(str(folder), attn_implementation="eager").eval()
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        return model(input_ids=t, attention_mask=(t != 1).long()).logits.numpy()


def test_export_hf_sequence_classification_matches_and_predict(cls_run, files, tmp_path):
    w = cls_run[0]
    assert cli(["export", str(w), "--to", "hf", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["EsmForSequenceClassification"] and cfg["num_labels"] == 4
    setup, variables, _ = load_finetuned(w)
    engine = Engine(nnx.merge(setup.graphdef, nnx.State(variables)), None, "dp")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQWERPSG"]
    tokens = batch_encode(seqs)
    ours = np.stack(predict(engine, [encode_with_specials(s) for s in seqs]))
    np.testing.assert_allclose(_hf_logits(tmp_path / "hf", tokens, False), ours, atol=1e-5)

    fa = tmp_path / "q.fa"
    fa.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    assert (
        cli(
            [
                "predict",
                "--checkpoint",
                str(w),
                "--fasta",
                str(fa),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"]
    for r, o in zip(rows, ours):
        probs = [float(r[f"prob_{n}"]) for n in "abcd"]
        assert abs(sum(probs) - 1) < 1e-4 and r["prediction"] == "abcd"[int(np.argmax(o))]


def test_export_peft_adapters_load_in_peft_and_fair_esm_backbone(cls_run, files, tmp_path):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import EsmForSequenceClassification

    from esmjax.inference.export import plain_variables
    from esmjax.io.convert_esm2 import read_fairesm

    w = cls_run[0]
    assert cli(["export", str(w), "--to", "peft", str(tmp_path / "ad")]) == 0
    assert cli(["export", str(files / "bb"), "--to", "hf", str(tmp_path / "base")]) == 0
    base = EsmForSequenceClassification.from_pretrained(
        str(tmp_path / "base"), num_labels=4, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    setup, variables, _ = load_finetuned(w)
    engine = Engine(nnx.merge(setup.graphdef, nnx.State(variables)), None, "dp")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ"]
    ours = np.stack(predict(engine, [encode_with_specials(s) for s in seqs]))
    t = torch.from_numpy(batch_encode(seqs).astype(np.int64))
    with torch.no_grad():
        theirs = model(input_ids=t, attention_mask=(t != 1).long()).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

    # --to fair-esm: the backbone with the adapters merged
    pt = tmp_path / "esm2_t2_merged.pt"
    assert cli(["export", str(w), "--to", "fair-esm", str(pt)]) == 0
    _, params, _ = read_fairesm(pt)
    merged = plain_variables(setup, variables)["esm"]
    for name in ("q_proj", "v_proj"):
        got = params["layers"]["self_attn"][name]["kernel"]
        np.testing.assert_allclose(got, merged["layers"]["self_attn"][name]["kernel"], atol=1e-7)


@pytest.mark.slow  # about 40-70 s on 2 shared cores (compilation)
def test_sequence_regression_full_on_tem1(tmp_path, files):
    _, rep, _ = finetune_run(
        tmp_path,
        files,
        "reg",
        {
            "mode": "full",
            "task": "sequence_regression",
            "data": {"csv": str(files / "tem1.csv"), "max_length": 64, "batch_size": 8},
        },
    )
    assert {"test_spearman", "test_pearson", "test_rmse", "baseline_test_rmse"} <= set(rep)
    assert np.isfinite(rep["test_rmse"])


@pytest.fixture(scope="module")
def res_run(tmp_path_factory, files):
    return finetune_run(
        tmp_path_factory.mktemp("res"),
        files,
        "res",
        {
            "mode": "frozen",
            "task": "residue_classification",
            "optim": {"peak_lr": 2e-2, "warmup_steps": 2},
            "num_steps": 24,
            "eval_every": 12,
            "data": {
                "fasta": str(files / "res.fa"),
                "labels": str(files / "res_labels.fa"),
                "mask": str(files / "res_mask.fa"),
                "batch_size": 16,
            },
        },
    )


def test_residue_classification_frozen_flip_layout_learns(res_run):
    rep = res_run[1]
    assert rep["labels"] == ["C", "H"]
    # hydrophobic or not is a function of the residue: a linear head on a frozen random backbone
    # beats the majority class on held-out sequences
    assert rep["test_accuracy"] > rep["baseline_test_accuracy"] + 0.1, rep


def test_export_hf_token_classification_matches_and_predict_jsonl(res_run, tmp_path):
    w = res_run[0]
    assert cli(["export", str(w), "--to", "hf", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["EsmForTokenClassification"] and cfg["id2label"]["1"] == "H"
    setup, variables, _ = load_finetuned(w)
    engine = Engine(nnx.merge(setup.graphdef, nnx.State(variables)), None, "dp")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ"]
    ours = predict(engine, [encode_with_specials(s) for s in seqs])
    theirs = _hf_logits(tmp_path / "hf", batch_encode(seqs), True)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(theirs[i, 1 : 1 + len(s)], ours[i], atol=1e-5)
    fa = tmp_path / "q.fa"
    fa.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--checkpoint", str(w), "--fasta", str(fa), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(r["prediction"]) for r in rows] == [len(s) for s in seqs]
    assert rows[0]["prediction"] == "".join("CH"[int(k)] for k in ours[0].argmax(-1))
