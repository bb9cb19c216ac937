"""``esmjax fold`` with its ESM-2 stem sharded computes what one device computes: the small
random-weight ESMFold restored from a checkpoint onto the 8 host devices (``fold_engine``: the stem
split by FSDP alone, and by FSDP plus tensor parallelism; the trunk and heads replicated) gives the
stem's features, the atom positions, pLDDT, pTM and PAE of the one-device restore within 1e-5 of
each output's scale, on a batch of monomers, a multimer and a padding row.

Of scale, not absolute: the split stem sums in another order (its features differ by about 1e-6,
within 1e-5 absolute), and the trunk carries that float32 rounding into outputs of 30 A and 65
pLDDT units (about 2e-5 there, ten float32 steps). The same model replicated on the 8 devices was
bit-identical to one device, so the differences are the stem's split and nothing else.
"""

import jax
import numpy as np
import pytest
from support.esmfold_reference import converted

from esmjax.config import MeshConfig
from esmjax.inference.engine import Engine
from esmjax.inference.fold import fold_batch, fold_engine, make_batches
from esmjax.io import checkpoint
from esmjax.io.fasta import Record
from esmjax.parallel import sharding as shd

ATOL = 1e-5
# 36, 40 and 9 + 25 (linker) + 5 = 39 residues: one batch of 4 rows (one of padding), width 48.
RECORDS = [
    Record("r36", "", "MKTVRQERLKSIVRILERSKEPVSGAXLAEELSVSR"),
    Record("r40", "", "MKTVRQERLKSIVRILERSKEPVSGAQLAEELSVSRQVIV"),
    Record("dimer", "", "ACDEFGHIK:LMNPQ"),
]
KEYS = ("features", "atom37", "plddt", "ptm", "predicted_aligned_error")
# No recycling: the stem runs once whatever the recycles, and the trunk passes that recycling adds
# are replicated (bit-identical); one pass keeps the compilations short.
NUM_RECYCLES = 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> checkpoint.Checkpoint:
    cfg, model = converted("small")  # ESM-2 stem: 2 layers, width 32, 4 heads, MLP 128
    path = tmp_path_factory.mktemp("esmfold") / "small"
    checkpoint.save_converted(path, cfg, checkpoint.params_numpy(model))
    return checkpoint.open(path)


@pytest.fixture(scope="module")
def batch():
    (only,) = make_batches(RECORDS, max_tokens=4 * 48)
    assert only.aatype.shape == (4, 48)
    return only


def _features(model, aatype, mask, residx):
    return model.language_features(aatype, mask)


def _fold(engine: Engine, batch) -> dict[str, np.ndarray]:
    """The outputs of ``KEYS`` for the batch's real rows (the last row is padding)."""
    out = fold_batch(engine, batch.aatype, batch.mask, batch.residx, NUM_RECYCLES)
    out["features"] = engine.forward(_features)(batch.aatype, batch.mask, batch.residx)
    return {k: np.asarray(out[k])[: len(batch.records)] for k in KEYS}


@pytest.fixture(scope="module")
def one_device(ckpt, batch):
    model, _ = checkpoint.load_esmfold(ckpt)  # the one-device restore fold used before
    engine = Engine(model)
    assert engine.mesh.size == 1
    return _fold(engine, batch)


def _split_leaves(engine: Engine) -> list[str]:
    """Paths of the parameters split over more than one device."""
    return [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(engine.state)
        if not x.sharding.is_fully_replicated
    ]


@pytest.mark.parametrize(
    "sizes, rules",
    [
        ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
        pytest.param(
            {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", marks=pytest.mark.slow
        ),  # 15 s more
    ],
    ids=["fsdp8", "data2_fsdp2_tensor2"],
)
def test_sharded_stem_folds_as_one_device(ckpt, batch, one_device, sizes, rules):
    if rules == "fsdp":
        mesh = None  # the mesh ``esmjax fold`` picks: the stem's 32 and 128 divide fsdp=8
    else:
        cfg = MeshConfig(ici_data=sizes["data"], ici_fsdp=sizes["fsdp"], ici_tensor=sizes["tensor"])
        mesh = shd.make_mesh(cfg)
    engine, step = fold_engine(ckpt, mesh=mesh, rules=rules)
    assert step == 0 and shd.mesh_sizes(engine.mesh) == sizes and engine.mesh.size == 8
    assert engine.row_multiple == 1  # rows are not split: the batch is the one-device batch

    # The stem really is split (every layer kernel over all 8 devices, heads over ``tensor`` with
    # TP), and nothing else is.
    split = _split_leaves(engine)
    assert all(p.startswith("['esm']") for p in split), split
    assert any("fc1" in p for p in split) and any("fc2" in p for p in split), split
    fc1 = engine.state["esm"]["layers"]["fc1"]["kernel"][...].sharding
    assert len(fc1.device_set) == 8 and not fc1.is_fully_replicated
    if sizes["tensor"] > 1:
        assert "tensor" in jax.tree_util.tree_leaves(tuple(fc1.spec)), fc1.spec

    got = _fold(engine, batch)
    for key in KEYS:
        want, have = one_device[key], got[key]
        assert np.isfinite(want).all() and want.shape == have.shape, key
        scale = max(1.0, float(np.abs(want).max()))  # Angstrom, pLDDT 0-100, pTM 0-1
        np.testing.assert_allclose(
            have, want, rtol=0, atol=ATOL * scale, err_msg=f"{key} on mesh {sizes} ({rules})"
        )
