"""Sharding: golden per-parameter tables for the rule presets, mesh sizing and the rule resolver."""

import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from esmjax.config import MeshConfig
from esmjax.parallel import sharding as shd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import dump_sharding  # noqa: E402


@pytest.mark.parametrize("case", dump_sharding.GOLDEN, ids=lambda c: c[0])
def test_golden_tables(case):
    stem, preset, sizes, rules = case
    want = (ROOT / "tests" / "golden" / f"{stem}.txt").read_text()
    assert dump_sharding.table(preset, sizes, rules) == want, (
        "regenerate with tools/dump_sharding.py --write-golden"
    )


def test_logical_to_spec_divisibility_and_reuse():
    rules = shd.resolve_rules("fsdp_tp")
    sizes = {"data": 1, "fsdp": 8, "tensor": 2}
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (1280, 20, 64), rules, sizes) == P(
        "fsdp", "tensor"
    )
    # 20 heads on tensor=8 do not divide: replicated rather than an error
    assert shd.logical_to_spec(("embed", "heads"), (64, 20), rules, {"fsdp": 1, "tensor": 8}) == P()
    # a mesh axis is used once per array
    assert shd.logical_to_spec(("embed", "embed"), (64, 64), rules, sizes) == P("fsdp")
    assert shd.logical_to_spec(
        ("act_batch", "act_len"), (16, 8), rules, {"data": 2, "fsdp": 4, "tensor": 1}
    ) == P(("data", "fsdp"))


def test_mesh_shape():
    assert shd.mesh_shape(MeshConfig(ici_fsdp=-1), 8) == (1, 8, 1)
    assert shd.mesh_shape(MeshConfig(ici_data=2, ici_fsdp=-1, ici_tensor=2), 8) == (2, 2, 2)
    assert shd.mesh_shape(MeshConfig(ici_fsdp=-1, dcn_data=2), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.mesh_shape(MeshConfig(ici_data=2, ici_fsdp=8), 8)
    with pytest.raises(ValueError, match="unknown sharding rules"):
        shd.resolve_rules("zero3")
    assert shd.resolve_rules([["embed", ["fsdp"]], ["mlp", "tensor"]]) == (
        ("embed", ("fsdp",)),
        ("mlp", ("tensor",)),
    )
