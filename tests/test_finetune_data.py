"""Fine-tuning data and metrics: FLIP's columns and attributes, explicit split files, multi-label
and residue targets, length-bucketed batches, and the metrics against scikit-learn."""

import numpy as np
import pytest

from esmjax.config import FinetuneConfig, FinetuneDataConfig
from esmjax.evaluate import finetune_metrics as fm
from esmjax.io import labeled
from esmjax.train.finetune_data import IGNORE, Encoded, Targets, train_batch


def test_flip_csv_columns_decide_the_splits(tmp_path):
    p = tmp_path / "flip.csv"
    p.write_text(
        "sequence,target,set,validation\n"
        "MKTAYIAK,a,train,False\nMKTAY,b,train,True\nGSHMLE,a;b,test,False\nMKTAYIAKQ,b,train,\n"
    )
    splits, skipped = labeled.load(FinetuneDataConfig(csv=str(p)), "sequence_classification")
    assert [len(splits[s]) for s in labeled.SPLITS] == [2, 1, 1] and not skipped
    assert splits["test"][0].target == ("a", "b")
    cfg = FinetuneConfig(backbone="x", multi_label=True)
    t = Targets(cfg, splits["train"])
    assert t.labels == ("a", "b")
    np.testing.assert_array_equal(t.encode(splits["test"][0]), [1.0, 1.0])
    with pytest.raises(labeled.LabeledDataError, match="several labels"):
        Targets(FinetuneConfig(backbone="x"), splits["train"]).encode(splits["test"][0])


def test_explicit_files_and_unknown_label(tmp_path):
    for name, rows in (("tr", "MKTA,x\nMKTAY,y\n"), ("va", "MKT,x\n"), ("te", "GSH,z\n")):
        (tmp_path / f"{name}.csv").write_text("sequence,target\n" + rows)
    cfg = FinetuneDataConfig(
        train=str(tmp_path / "tr.csv"),
        valid=str(tmp_path / "va.csv"),
        test=str(tmp_path / "te.csv"),
    )
    splits, _ = labeled.load(cfg, "sequence_classification")
    assert [len(splits[s]) for s in labeled.SPLITS] == [2, 1, 1]
    t = Targets(FinetuneConfig(backbone="x"), splits["train"])
    with pytest.raises(labeled.LabeledDataError, match=r"te\.csv:2: unknown label"):
        Encoded(splits["test"], t, False, None)


def test_residue_fasta_mask_and_batches(tmp_path):
    (tmp_path / "s.fa").write_text(">p1\nMKTAYIAK\n>p2\nGSHM\n")
    (tmp_path / "l.fa").write_text(
        ">p1 SET=train VALIDATION=False\nHHHEECCX\n>p2 SET=test VALIDATION=False\nCCEE\n"
    )
    (tmp_path / "m.fa").write_text(">p1\n11111110\n>p2\n0111\n")
    cfg = FinetuneDataConfig(
        fasta=str(tmp_path / "s.fa"),
        labels=str(tmp_path / "l.fa"),
        mask=str(tmp_path / "m.fa"),
        valid_fraction=0,
    )
    splits, _ = labeled.load(cfg, "residue_classification")
    t = Targets(FinetuneConfig(backbone="x", task="residue_classification"), splits["train"])
    assert t.labels == ("C", "E", "H")  # the masked X is not a class
    enc = Encoded(splits["train"], t, False, None)
    b = train_batch(enc, 0, 2, 0)
    assert b["tokens"].shape == (2, 16) and b["labels"].shape == (2, 16)
    np.testing.assert_array_equal(
        b["labels"][0, :10], [IGNORE, 2, 2, 2, 1, 1, 0, 0, IGNORE, IGNORE]
    )
    assert b["weights"][0].sum() == 7


def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4))
    y = rng.integers(0, 4, 200)
    logits[np.arange(100), y[:100]] += 2
    m = fm.classification(logits, y)
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y, pred))
    yb = (y > 1).astype(int)
    two = np.stack([-logits[:, 0], logits[:, 0]], 1)
    p1 = 1 / (1 + np.exp(-2 * logits[:, 0]))
    assert fm.classification(two, yb)["auroc"] == pytest.approx(sk.roc_auc_score(yb, p1))
    t = rng.normal(size=(50, 2))
    from scipy.stats import pearsonr, spearmanr

    p = t + rng.normal(size=(50, 2))
    r = fm.regression(p, t)
    assert r["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(t, p)))
    assert r["spearman"] == pytest.approx(np.mean([spearmanr(t[:, j], p[:, j])[0] for j in (0, 1)]))
    assert r["pearson"] == pytest.approx(np.mean([pearsonr(t[:, j], p[:, j])[0] for j in (0, 1)]))
