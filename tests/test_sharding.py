"""Sharding: golden per-parameter tables for the rule presets, mesh sizing, the rule resolver and
the check that no parameter is replicated silently."""

import logging
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from esmjax.config import (
    ConfigError,
    MeshConfig,
    TrainConfig,
    esm2_from_shape,
    esm2_preset,
    from_dict,
)
from esmjax.errors import InputError
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


# --------------------------------------------------------------------------------------------------
# No silent replication (issue 11 §3)
# --------------------------------------------------------------------------------------------------
# Width 36 on fsdp=8: every `embed` dimension fails its rule (36 % 8 = 4); `mlp` (144) still splits.
ODD = esm2_from_shape(2, 36, 3)


def _abstract(cfg):
    from esmjax.models.esm2 import abstract_model

    return abstract_model(cfg)[1]


def test_replication_report_finds_failed_rules_only():
    rules = shd.resolve_rules("fsdp")
    report, total = shd.replication_report(
        _abstract(ODD), {"data": 1, "fsdp": 8, "tensor": 1}, rules
    )
    by_path = {r.path: r for r in report}
    fc1 = by_path["layers.fc1.kernel"]  # [layers, embed, mlp]: embed fails, mlp takes fsdp
    assert fc1.spec == P(None, None, "fsdp")
    assert fc1.bytes_per_device == 2 * 36 * 144 // 8 * 4
    (f,) = fc1.failed
    assert (f.dim, f.name, f.size, f.axis, f.axis_size) == (1, "embed", 36, "fsdp", 8)
    assert by_path["layers.fc2.bias"].spec == P() and "embed_tokens.embedding" in by_path
    # Layer norms (`norm`: no rule) and rotary buffers are replicated by design, not reported.
    assert not any("layer_norm" in p or "inv_freq" in p for p in by_path)
    assert total > sum(r.bytes_per_device for r in report) > 0.05 * total
    # A mesh that divides the model: nothing to report; the golden preset tables stay clean too.
    assert (
        shd.replication_report(_abstract(ODD), {"data": 2, "fsdp": 4, "tensor": 1}, rules)[0] == []
    )
    for _, preset, sizes, name in dump_sharding.GOLDEN:
        abstract = _abstract(esm2_preset(preset))
        assert shd.replication_report(abstract, sizes, shd.resolve_rules(name))[0] == [], preset


def test_tree_shardings_refuses_replication_unless_allowed(caplog):
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1))  # 8 host devices on fsdp
    rules = shd.resolve_rules("fsdp")
    abstract = _abstract(ODD)
    with pytest.raises(shd.ShardingError) as e:
        shd.tree_shardings(abstract, mesh, rules)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, InputError)
    # The largest offender, its dimension, size and mesh axis, and meshes that would divide it.
    assert (
        "the largest is layers.self_attn.k_proj.kernel [2x36x3x12], whose dim 1 (embed) of size 36"
        in msg
    )
    assert "mesh axis fsdp=8" in msg
    assert (
        "data=1,fsdp=6,tensor=1 (6 devices)" in msg and "data=1,fsdp=9,tensor=1 (9 devices)" in msg
    )
    assert "data=2,fsdp=4,tensor=1 (the same 8 devices)" in msg
    assert "mesh.allow_replicated=true" in msg
    # allow_replicated: the same shardings as the rules give, every offender logged with its bytes.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esmjax.parallel.sharding"):
        shardings = shd.tree_shardings(abstract, mesh, rules, allow_replicated=True)
    assert shardings["layers"]["fc1"]["kernel"].spec == P(None, None, "fsdp")
    assert shardings["layers"]["fc2"]["bias"].spec == P()
    text = caplog.text
    assert (
        "replicated: layers.fc1.kernel 2x36x144 P(None, None, 'fsdp'), 5.06 KiB per device" in text
    )
    assert "replicated: embed_tokens.embedding" in text and "accepted" in text


def test_small_replication_only_warns(caplog):
    """A failed rule on a small parameter (the 33-token vocab on tensor=2) is listed, not fatal."""
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=4, ici_tensor=2))
    rules = shd.resolve_rules([["embed", ["fsdp"]], ["mlp", ["fsdp"]], ["vocab", ["tensor"]]])
    with caplog.at_level(logging.WARNING, logger="esmjax.parallel.sharding"):
        shd.tree_shardings(_abstract(esm2_preset("demo")), mesh, rules)
    assert "replicated: embed_tokens.embedding 33x128" in caplog.text
    assert "replicated: lm_head.bias 33" in caplog.text and "under the 5% limit" in caplog.text


def test_mesh_config_validates_rules_at_load():
    with pytest.raises(ConfigError, match=r"^mesh\.rules: unknown sharding rules 'bogus'"):
        from_dict(TrainConfig, {"model": "tiny", "mesh": {"rules": "bogus"}})
    with pytest.raises(ConfigError, match=r"mesh\.rules: unknown logical axis 'embedd'"):
        from_dict(TrainConfig, {"model": "tiny", "mesh": {"rules": [["embedd", ["fsdp"]]]}})
    with pytest.raises(ConfigError, match=r"mesh\.ici_fsdp: must be a positive size or -1"):
        from_dict(TrainConfig, {"model": "tiny", "mesh": {"ici_fsdp": 0}})
    cfg = from_dict(TrainConfig, {"model": "tiny", "mesh": {"allow_replicated": "true"}})
    assert cfg.mesh.allow_replicated is True and MeshConfig().allow_replicated is False


# --------------------------------------------------------------------------------------------------
# Hybrid meshes: ici axes inside a granule (GPU node, TPU slice), dcn axes across them
# --------------------------------------------------------------------------------------------------
def fake_gpus(nodes: int, per_node: int) -> list:
    """Stand-ins for the GPUs of a multi-node job as JAX lists them (one process per node)."""
    from types import SimpleNamespace

    return [
        SimpleNamespace(
            id=n * per_node + i,
            process_index=n,
            platform="gpu",
            device_kind="NVIDIA H100 80GB HBM3",
        )
        for n in range(nodes)
        for i in range(per_node)
    ]


def granule_of_each_block(arr, ici) -> dict:
    """{dcn coordinate: the processes of the devices at it}."""
    import numpy as np

    out: dict = {}
    for idx in np.ndindex(arr.shape):
        key = tuple(i // s for i, s in zip(idx, ici))
        out.setdefault(key, set()).add(arr[idx].process_index)
    return out


def test_hybrid_mesh_keeps_fsdp_inside_a_node():
    """16 nodes x 8 GPUs, dcn_data=16: every fsdp group is the 8 GPUs of one node."""
    devices = fake_gpus(16, 8)
    ici, dcn = shd.mesh_split(MeshConfig(ici_fsdp=-1, dcn_data=16), len(devices))
    assert (ici, dcn) == ((1, 8, 1), (16, 1, 1))
    arr = shd.hybrid_devices(ici, dcn, devices)
    assert arr.shape == (16, 8, 1)
    for d in range(16):
        assert {x.process_index for x in arr[d, :, 0]} == {d}


def test_hybrid_mesh_dcn_fsdp_with_ici_data_does_not_mix_nodes():
    """2 nodes x 4 GPUs, ici_data=2 x ici_fsdp=2 inside a node, dcn_fsdp=2 across: each node holds
    one (data 2 x fsdp 2) block, and fsdp crosses the nodes. Row-major by id (the mesh before)
    put data across the nodes instead."""
    devices = fake_gpus(2, 4)
    cfg = MeshConfig(ici_data=2, ici_fsdp=2, dcn_fsdp=2)
    ici, dcn = shd.mesh_split(cfg, len(devices))
    arr = shd.hybrid_devices(ici, dcn, devices)
    assert arr.shape == (2, 4, 1)
    blocks = granule_of_each_block(arr, ici)
    assert blocks == {(0, 0, 0): {0}, (0, 1, 0): {1}}
    for d in range(2):  # each fsdp group spans both nodes
        assert {x.process_index for x in arr[d, :, 0]} == {0, 1}


def test_hybrid_mesh_on_one_process_splits_its_devices():
    """One process stands in for 2 hosts: its 8 devices split into 2 granules by id, so a
    1-process run has the mesh of the 2-host run it is compared with."""
    import jax

    mesh = shd.make_mesh(MeshConfig(ici_fsdp=1, ici_tensor=4, dcn_data=2))
    assert mesh.devices.shape == (2, 1, 4)
    assert [d.id for d in mesh.devices[0, 0]] == [d.id for d in jax.devices()[:4]]


def test_hybrid_mesh_over_two_tpu_slices():
    """Compile-only devices of two v5p-8 slices (libtpu): dcn_data=2 puts one slice on each data
    row; dcn sizes that are not the slice count are refused."""
    from esmjax.parallel import targets

    devs = targets.compile_only_devices(targets.parse_target("v5p-8", slices=2))
    mesh = shd.make_mesh(MeshConfig(ici_fsdp=-1, dcn_data=2), devs)
    assert mesh.devices.shape == (2, 4, 1)
    for d in range(2):
        assert len({x.slice_index for x in mesh.devices[d].flat}) == 1
    with pytest.raises(shd.ShardingError, match="form 2 slice"):
        shd.make_mesh(MeshConfig(ici_fsdp=-1, dcn_data=4), devs)
    with pytest.raises(shd.ShardingError, match="form 2 slice"):
        shd.make_mesh(MeshConfig(ici_fsdp=-1), devs)
