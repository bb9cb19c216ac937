"""A sharded model computes what one device computes: ``Engine.embed`` (the representations of
every layer, logits, contacts) of the tiny 2-layer ESM-2 on 8 host devices, with its parameters
split by FSDP alone and by FSDP plus tensor parallelism, equals the single-device pass within
1e-5 on real CATH sequences of different lengths."""

import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

from esmjax.config import MeshConfig
from esmjax.inference.embed import make_batches
from esmjax.inference.engine import Engine
from esmjax.io import checkpoint
from esmjax.io.fasta import read_fasta
from esmjax.parallel import sharding as shd

ATOL = 1e-5
ROWS = 8  # rows per batch: a multiple of every engine's batch axes, so all see the same arrays
MAX_TOKENS = ROWS * 192
CATH = Path(__file__).resolve().parents[1] / "data" / "cath_s20.fa.gz"  # bundled demo data


@pytest.fixture(scope="module")
def batches():
    """The first 6 CATH S20 domains (129 to 330 residues): three length buckets (padded widths
    192, 256 and 384), each one batch of 8 rows."""
    records = list(itertools.islice(read_fasta(CATH), 6))
    out = list(make_batches(records, MAX_TOKENS, None, row_multiple=ROWS))
    assert sorted(b.tokens.shape for b in out) == [(8, 192), (8, 256), (8, 384)]
    return out


def _embed_all(engine: Engine, batches) -> list[dict]:
    layers = tuple(range(engine.cfg.num_layers + 1))
    outs = []
    for b in batches:
        out = engine.embed(b.tokens, layers, contacts=True, logits=True)
        n = len(b.records)  # real rows; the rest are padding rows
        outs.append(
            {
                **{f"repr_{k}": v[:n] for k, v in out["representations"].items()},
                "logits": out["logits"][:n],
                "contacts": out["contacts"][:n],
            }
        )
    return outs


@pytest.fixture(scope="module")
def one_device(ckpt, batches):
    model, _ = checkpoint.load_model(ckpt)
    engine = Engine(model)
    assert engine.mesh.size == 1
    return _embed_all(engine, batches)


def _sharded_leaves(engine: Engine) -> list[str]:
    """Paths of the parameters split over more than one device (not replicated)."""
    leaves = jax.tree_util.tree_leaves_with_path(engine.state)
    return [
        jax.tree_util.keystr(path)
        for path, x in leaves
        if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
    ]


@pytest.mark.parametrize(
    "sizes, rules",
    [
        ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
        ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
    ],
    ids=["fsdp8", "data2_fsdp2_tensor2"],
)
def test_sharded_embed_equals_one_device(ckpt, batches, one_device, sizes, rules):
    if rules == "fsdp":
        # The mesh ``esmjax embed`` picks: the tiny model's dimensions (32, 128) divide fsdp=8.
        mesh = checkpoint.inference_mesh(ckpt, rules)
    else:
        cfg = MeshConfig(ici_data=sizes["data"], ici_fsdp=sizes["fsdp"], ici_tensor=sizes["tensor"])
        mesh = shd.make_mesh(cfg)
    assert shd.mesh_sizes(mesh) == sizes and mesh.size == 8
    model, _ = checkpoint.load_model(ckpt, mesh=mesh, rules=rules)  # refuses silent replication
    engine = Engine(model, mesh, rules)
    assert ROWS % engine.row_multiple == 0

    # The parameters really are split: every layer kernel over the mesh, over ``tensor`` with TP.
    sharded = _sharded_leaves(engine)
    assert any("fc1" in p for p in sharded) and any("fc2" in p for p in sharded), sharded
    fc1 = engine.state["layers"]["fc1"]["kernel"][...].sharding
    assert len(fc1.device_set) == 8 and not fc1.is_fully_replicated
    if sizes["tensor"] > 1:
        assert "tensor" in jax.tree_util.tree_leaves(tuple(fc1.spec)), fc1.spec

    got = _embed_all(engine, batches)
    assert engine.traces == len(batches)  # one compilation per length bucket
    assert len(got) == len(one_device)
    for b, want, have in zip(batches, one_device, got, strict=True):
        assert want.keys() == have.keys() == {"repr_0", "repr_1", "repr_2", "logits", "contacts"}
        for key in want:
            assert np.isfinite(want[key]).all(), key
            assert want[key].shape == have[key].shape, key
            np.testing.assert_allclose(
                have[key],
                want[key],
                rtol=0,
                atol=ATOL,
                err_msg=f"{key} of width {b.tokens.shape[1]} on mesh {sizes} ({rules})",
            )
