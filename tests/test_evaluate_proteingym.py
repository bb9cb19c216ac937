"""ProteinGym zero-shot fitness: the metric functions against ProteinGym's own scoring code, the
three scores against direct computations with the model, windowing, the command end to end on a
ProteinGym-layout folder built from the TEM-1 scan (ProteinGym's BLAT_ECOLX), resuming, bad
input."""

import csv
import importlib.metadata
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esmjax.cli import main as cli
from esmjax.config import MeshConfig
from esmjax.evaluate import fitness_metrics as fm
from esmjax.evaluate import proteingym as pg
from esmjax.evaluate import variants as vr
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.models.alphabet import BOS, EOS, MASK, TOKEN_TO_ID, encode
from esmjax.parallel import sharding as shd


def _reference_module():
    """``proteingym/performance_DMS_benchmarks.py`` of the installed ``proteingym`` package.

    Loaded by path: proteingym 1.3's ``__init__`` imports a ``proteingym.utils`` the wheel does not
    ship, so ``import proteingym`` fails. The module needs pandas and scikit-learn.
    """
    # The test extra installs all three: a missing one is a broken install, not a reason to skip.
    import pandas  # noqa: F401
    import sklearn  # noqa: F401

    dist = importlib.metadata.distribution("proteingym")
    path = dist.locate_file("proteingym/performance_DMS_benchmarks.py")
    spec = importlib.util.spec_from_file_location("proteingym_performance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_metrics_equal_proteingym_reference():
    ref = _reference_module()
    import pandas as pd
    from sklearn.metrics import matthews_corrcoef, roc_auc_score

    rng = np.random.default_rng(0)
    for n, ties in ((57, False), (200, True), (1000, True), (31, False)):
        true = rng.normal(size=n)
        score = 0.4 * true + rng.normal(size=n)
        if ties:  # repeated values on both sides, as in real assays
            true, score = np.round(true, 1), np.round(score, 1)
        b = (true > np.quantile(true, 0.6)).astype(int)
        got = fm.assay_metrics(true, b, score)
        # Exactly the reference's expressions (performance_DMS_benchmarks.main).
        s = pd.Series(score)
        cutoff = s.median()
        pred = s.map(lambda x, c=cutoff: 1 if x >= c else 0)
        want = {
            "spearman": ref.spearmanr(true, score)[0],
            "auc": roc_auc_score(y_true=b, y_score=score),
            "mcc": matthews_corrcoef(y_true=b, y_pred=pred),
            "ndcg": ref.calc_ndcg(pd.Series(true), pd.Series(score)),
            "top_recall": ref.calc_toprecall(true, score),
        }
        for m in fm.METRICS:
            assert got[m] == pytest.approx(want[m], abs=1e-12), (n, ties, m)
    # Degenerate cases: one class (AUC undefined), constant scores (MCC 0 as sklearn).
    assert np.isnan(fm.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert fm.mcc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == matthews_corrcoef([0, 1, 0, 1], [1] * 4)


def test_aggregate_as_proteingym():
    """Assays -> (UniProt, selection type) means -> selection-type means -> their mean, as the
    reference's summary (groupby UniProt_ID and Selection Type, then Selection Type, then mean)."""
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = []
    for k, (uid, t) in enumerate(
        [("P1", "Activity"), ("P1", "Activity"), ("P2", "Activity"), ("P3", "Stability")]
        + [("P4", "Binding"), ("P4", "Binding"), ("P5", "Stability")]
    ):
        rows.append(
            {
                "dms_id": f"A{k}",
                "uniprot_id": uid,
                "selection_type": t,
                "metrics": {m: float(rng.uniform()) for m in fm.METRICS},
            }
        )
    got = fm.aggregate(rows)
    df = pd.DataFrame(
        [
            {"UniProt_ID": r["uniprot_id"], "Selection Type": r["selection_type"], **r["metrics"]}
            for r in rows
        ]
    )
    per = df.groupby(["UniProt_ID", "Selection Type"]).mean(numeric_only=True)
    by_type = per.groupby("Selection Type").mean(numeric_only=True)
    final = by_type.reset_index().mean(numeric_only=True)
    for m in fm.METRICS:
        assert got["overall"][m] == pytest.approx(final[m], abs=1e-12)
        for t in by_type.index:
            assert got["by_selection_type"][t][m] == pytest.approx(by_type.loc[t, m], abs=1e-12)


def test_optimal_window():
    assert pg.optimal_window(5, 100, 1022) == (0, 100)
    assert pg.optimal_window(10, 300, 100) == (0, 100)
    assert pg.optimal_window(290, 300, 100) == (200, 300)
    assert pg.optimal_window(150, 300, 100) == (100, 200)


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tem1(shared_data):
    return vr.read_dms(shared_data / "esm_examples" / "P62593.fasta")


@pytest.fixture(scope="module")
def engine(ckpt):
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))
    return Engine(checkpoint.load_model(ckpt, mesh=mesh)[0], mesh)


@pytest.fixture(scope="module")
def direct_model(ckpt):
    return checkpoint.load_model(ckpt)[0]


def _direct_logp(model, seq, positions, masked):
    """[len(positions), V] log-probabilities from one unpadded row per position, on one device."""
    rows = np.repeat(np.concatenate([[BOS], encode(seq), [EOS]])[None], len(positions), 0)
    at = np.array(positions) + 1
    if masked:
        rows[np.arange(len(positions)), at] = MASK
    lp = jax.nn.log_softmax(model(jnp.asarray(rows))["logits"], -1)
    return np.asarray(lp)[np.arange(len(positions)), at]


def test_scores_equal_direct_computation(direct_model, engine, tem1):
    ckpt = direct_model
    wt = tem1.wild_type[:40]
    variants = [
        vr.Variant("M1A", (vr.Mutation(wt[0], 0, "A"),), 0.0, 0),
        vr.Variant("x", (vr.Mutation(wt[19], 19, "W"), vr.Mutation(wt[27], 27, "D")), 0.0, 0),
        vr.Variant("y", (vr.Mutation(wt[35], 35, "K"),), 0.0, 0),
    ]
    muts = [m for v in variants for m in v.mutations]
    for masked in (True, False):
        lp = _direct_logp(ckpt, wt, [m.position for m in muts], masked)
        d = [lp[k, TOKEN_TO_ID[m.mt]] - lp[k, TOKEN_TO_ID[m.wt]] for k, m in enumerate(muts)]
        want = [d[0], d[1] + d[2], d[3]]
        got = pg.marginal_scores(engine, wt, variants, masked=masked)
        np.testing.assert_allclose(got, want, atol=2e-5)
    # masked marginals with no crop equal `evaluate variants`' scores
    np.testing.assert_allclose(
        pg.marginal_scores(engine, wt, variants), vr.masked_marginal_scores(engine, wt, variants)
    )
    # A window of 16: position 19 is scored inside wt[11:27], position 35 inside wt[24:40].
    lp2 = _direct_logp(ckpt, wt[24:40], [11], True)[0]
    got = pg.marginal_scores(engine, wt, [variants[1], variants[2]], window=16)
    assert got[1] == pytest.approx(lp2[TOKEN_TO_ID["K"]] - lp2[TOKEN_TO_ID[wt[35]]], abs=2e-5)
    assert not np.isclose(got[0], want[1], atol=1e-3)  # the crop changed the context


@pytest.mark.slow
def test_pll_equals_direct_computation(direct_model, engine, tem1):
    """PLL: sum of masked log-probabilities of each sequence, mutant minus wild type."""
    ckpt, wt = direct_model, tem1.wild_type[:40]
    variants = [vr.Variant("y", (vr.Mutation(wt[35], 35, "K"),), 0.0, 0)]
    mt = vr.apply_mutations(wt, variants[0].mutations)
    pll = {}
    for s in (wt, mt):
        lp = _direct_logp(ckpt, s, list(range(len(s))), True)
        pll[s] = sum(lp[i, TOKEN_TO_ID[c]] for i, c in enumerate(s))
    got = pg.pll_scores(engine, wt, variants)
    assert got[0] == pytest.approx(pll[mt] - pll[wt], abs=1e-4)


# --------------------------------------------------------------------------------------------------
def _write_assay(path, wt, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mutant", "mutated_sequence", "DMS_score", "DMS_score_bin"])
        for name, seq, score, b in rows:
            w.writerow([name, seq, score, b])


@pytest.fixture(scope="module")
def pg_folder(tem1, tmp_path_factory):
    """ProteinGym layout: BLAT_ECOLX (every 90th TEM-1 variant plus synthetic double mutants with
    additive fitness) and a second, shorter synthetic assay of another selection type."""
    d = tmp_path_factory.mktemp("proteingym")
    wt = tem1.wild_type
    singles = tem1.variants[::90]
    med = float(np.median([v.fitness for v in tem1.variants]))
    rows = [
        (v.name, vr.apply_mutations(wt, v.mutations), v.fitness, int(v.fitness > med))
        for v in singles
    ]
    for a, b in zip(singles[:20], singles[20:40]):
        if a.mutations[0].position != b.mutations[0].position:
            muts = a.mutations + b.mutations
            f = a.fitness + b.fitness
            rows.append((f"{a.name}:{b.name}", vr.apply_mutations(wt, muts), f, int(f > 2 * med)))
    _write_assay(d / "BLAT_ECOLX_Synthetic.csv", wt, rows)
    short = wt[:80]
    rng = np.random.default_rng(0)
    rows2 = []
    for i in range(1, 80, 3):
        mt = "A" if short[i] != "A" else "G"
        f = float(rng.normal())
        rows2.append((f"{short[i]}{i + 1}{mt}", short[:i] + mt + short[i + 1 :], f, int(f > 0)))
    _write_assay(d / "SHORT_Synthetic.csv", short, rows2)
    with open(d / "DMS_substitutions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["DMS_id", "DMS_filename", "UniProt_ID", "target_seq", "coarse_selection_type"])
        w.writerow(
            [
                "BLAT_ECOLX_Synthetic",
                "BLAT_ECOLX_Synthetic.csv",
                "BLAT_ECOLX",
                wt,
                "OrganismalFitness",
            ]
        )
        w.writerow(["SHORT_Synthetic", "SHORT_Synthetic.csv", "SHORT", short, "Activity"])
    return d


def pg_run(ckpt, folder, out, *extra):
    args = ["evaluate", "proteingym", "--checkpoint", str(ckpt), "--folder", str(folder)]
    return cli([*args, "--out", str(out), "--no-progress", *extra])


def test_command_end_to_end_and_resume(ckpt, pg_folder, tmp_path, capsys):
    out = tmp_path / "rep"
    assert pg_run(ckpt, pg_folder, out, "--plot", "--window", "100") == 0
    text = capsys.readouterr().out
    assert "BLAT_ECOLX_Synthetic" in text and "mean" in text
    rep = json.loads((out / "proteingym.json").read_text())
    res = rep["results"]
    assert res["assays"] == 2 and res["resumed_assays"] == 0
    assert res["windowed_assays"] == ["BLAT_ECOLX_Synthetic"]  # 286 residues > 100 > 80
    by = {r["dms_id"]: r for r in res["per_assay"]}
    assert by["BLAT_ECOLX_Synthetic"]["multi_mutants"] == 20
    # The metrics follow from the cached scores.
    scores = list(csv.DictReader(open(out / "proteingym_assays" / "SHORT_Synthetic_scores.csv")))
    true = np.array([float(r["DMS_score"]) for r in scores])
    model = np.array([float(r["score"]) for r in scores])
    b = np.array([int(r["DMS_score_bin"]) for r in scores])
    want = fm.assay_metrics(true, b, model)
    for m in fm.METRICS:
        assert by["SHORT_Synthetic"]["metrics"][m] == pytest.approx(want[m], abs=1e-4)
    summary = res["summary"]
    assert set(summary["by_selection_type"]) == {"Activity", "OrganismalFitness"}
    assert summary["overall"]["spearman"] == pytest.approx(
        np.mean([r["metrics"]["spearman"] for r in res["per_assay"]])
    )
    assert (out / "proteingym_spearman.png").stat().st_size > 5_000
    lines = (out / "proteingym_assays.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("DMS_id,UniProt_ID,selection_type")
    # Second run: every assay from the cache, same numbers; another method is not taken from it.
    assert pg_run(ckpt, pg_folder, out, "--window", "100") == 0
    rep2 = json.loads((out / "proteingym.json").read_text())
    assert rep2["results"]["resumed_assays"] == 2
    assert rep2["results"]["summary"] == rep["results"]["summary"]
    assert (
        pg_run(ckpt, pg_folder, out, "--assays", "SHORT_Synthetic", "--method", "wt-marginals") == 0
    )
    rep3 = json.loads((out / "proteingym.json").read_text())["results"]
    assert rep3["resumed_assays"] == 0 and rep3["assays"] == 1


def test_bad_input(ckpt, pg_folder, tmp_path, capsys):
    import shutil

    d = tmp_path / "pg"
    shutil.copytree(pg_folder, d)
    ref = (d / "DMS_substitutions.csv").read_text()
    # an assay file that is not there
    (d / "DMS_substitutions.csv").write_text(ref.replace("SHORT_Synthetic.csv", "GONE.csv"))
    assert pg_run(ckpt, d, tmp_path / "o") == 2
    assert "assay SHORT_Synthetic: no such file" in capsys.readouterr().err
    (d / "DMS_substitutions.csv").write_text(ref)
    # an unknown assay id
    assert pg_run(ckpt, d, tmp_path / "o", "--assays", "NOPE") == 2
    assert "--assays: NOPE not in" in capsys.readouterr().err
    # a mutant that does not match target_seq (row 3 of the file), then skipped and counted
    lines = (d / "SHORT_Synthetic.csv").read_text().splitlines()
    name = lines[2].split(",")[0]
    wrong = ("W" if name[0] != "W" else "A") + name[1:]
    lines[2] = lines[2].replace(name, wrong, 1)
    (d / "SHORT_Synthetic.csv").write_text("\n".join(lines) + "\n")
    assert pg_run(ckpt, d, tmp_path / "o", "--assays", "SHORT_Synthetic") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"SHORT_Synthetic.csv:3: mutant {wrong}: wild-type residue" in err[0]
    assert pg_run(ckpt, d, tmp_path / "o", "--assays", "SHORT_Synthetic", "--skip-invalid") == 0
    res = json.loads((tmp_path / "o" / "proteingym.json").read_text())["results"]
    assert res["skipped"] == {"wild-type mismatch": 1} and res["variants"] == 26
    # a missing column
    (d / "SHORT_Synthetic.csv").write_text("variant,DMS_score\nM1A,0.5\n")
    assert pg_run(ckpt, d, tmp_path / "o2", "--assays", "SHORT_Synthetic") == 2
    assert "lacks column(s) mutant" in capsys.readouterr().err
