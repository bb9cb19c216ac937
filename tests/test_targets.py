"""Accelerator targets by name, the compiled-program reader, the flags the launchers and plans
share, and the kernel choice following the platform a program is compiled for."""

import re
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from esmjax.errors import InputError
from esmjax.models.attention import choose_attention
from esmjax.parallel import compiled, sharding, targets, xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name,topology,devices,per_host",
    [
        ("v5p-8", "v5p:2x2x1", 4, 4),
        ("v5p-16", "v5p:2x2x2", 8, 4),
        ("v5p-128", "v5p:4x4x4", 64, 4),
        ("v5p-256", "v5p:4x4x8", 128, 4),
        ("v5p:4x4x4", "v5p:4x4x4", 64, 4),
        ("v4-32", "v4:2x2x4", 16, 4),
        ("v5e-16", "v5e:4x4", 16, 4),
        ("v6e-64", "v6e:8x8", 64, 4),
        ("v6e-1", "v6e:1x1", 1, 1),
    ],
)
def test_tpu_names(name, topology, devices, per_host):
    t = targets.parse_target(name)
    assert (t.topology, t.num_devices, t.per_host, t.chip.platform) == (
        topology,
        devices,
        per_host,
        "tpu",
    )


def test_tpu_slices_and_gpu_hosts():
    t = targets.parse_target("v5p-128", slices=2)
    assert t.num_devices == 128 and t.slices == 2 and t.cloud_name == "v5p-128"
    assert t.name == "TPU v5p:4x4x4 x 2 slices (128 chips)"
    g = targets.parse_target("h100:16x8")
    assert (g.num_devices, g.hosts, g.per_host) == (128, 16, 8) and g.name == "16 x 8 H100"
    assert targets.parse_target("h100-64").hosts == 8
    assert targets.parse_target("h100-2").per_host == 2
    assert targets.parse_target("H200").chip.hbm_gib == pytest.approx(141.0, abs=0.1)


@pytest.mark.parametrize("bad", ["", "a100", "v5p-", "h100:8", "v5p:4x4", "v6e:2x2x2", "v5p-6"])
def test_bad_targets(bad):
    with pytest.raises(InputError):
        targets.parse_target(bad)


def test_h200_spec_is_h100_with_its_memory():
    h100 = targets.gpu_target_config(targets.CHIPS["h100"])
    h200 = targets.gpu_target_config(targets.CHIPS["h200"])
    assert "device_memory_size: 84942979072" in h100
    assert "device_memory_size: 151397597184" in h200 and 'name: "NVIDIA H200"' in h200
    assert "collective_memory_granularity:" not in h100  # jax 0.10.2's parser rejects it
    changed = {a for a, b in zip(h100.splitlines(), h200.splitlines()) if a != b}
    assert len(changed) == 4, changed


def test_aot_gpu_pins_agree():
    """pyproject's aot-gpu extra and the Makefile's AOT_GPU (what make test installs) agree."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(extra["optional-dependencies"]["aot-gpu"])
    make = re.search(r"^AOT_GPU := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert make and set(make.group(1).split()) == pins


def test_flags_keep_the_users():
    env = {"XLA_FLAGS": "--xla_gpu_enable_pipelined_all_gather=false --xla_dump_to=/tmp/d"}
    xla_flags.apply("gpu", env)
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_gpu_enable_pipelined_all_gather=false", "--xla_dump_to=/tmp/d"]
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    xla_flags.apply("gpu", env)
    assert env["XLA_FLAGS"].split() == flags  # idempotent
    tpu = {}
    xla_flags.apply("tpu", tpu)
    assert tpu["LIBTPU_INIT_ARGS"] == xla_flags.flags("tpu")[1]
    xla_flags.apply("cpu", tpu)  # nothing for a CPU


# Optimized HLO in the shape both compilers print: a while loop whose trip count XLA recorded,
# one whose count is only in its condition, an async all-gather pair, libtpu's async collective
# fusion (the same channel twice) and its reduce-scatter (a fusion around an all-reduce).
HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(6)
  %i = s32[] get-tuple-element((s32[], f32[8]) %p), index=0
  ROOT %lt = pred[] compare(s32[] %i, s32[] %c), direction=LT
}

%gather_start (x: bf16[2,64]) -> bf16[8,64] {
  %x = bf16[2,64] parameter(0)
  ROOT %all-gather.1 = bf16[8,64]{1,0} all-gather(bf16[2,64]{1,0} %x), channel_id=7, dimensions={0}
}

%async_collective_fusion.3 (x: bf16[2,64]) -> bf16[8,64] {
  %x = bf16[2,64] parameter(0)
  ROOT %all-gather.2 = bf16[8,64]{1,0} all-gather(bf16[2,64]{1,0} %x), channel_id=7, dimensions={0}
}

%all-reduce-scatter.1 (x: f32[8,16]) -> f32[2,16] {
  %x = f32[8,16] parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %x), channel_id=9, to_apply=%add
  ROOT %ds = f32[2,16]{1,0} dynamic-slice(f32[8,16]{1,0} %ar), dynamic_slice_sizes={2,16}
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %s = (bf16[2,64], bf16[8,64]) async-collective-start(bf16[2,64] %w), calls=%gather_start
  %f = bf16[8,64] fusion(bf16[2,64] %w), kind=kCustom, calls=%async_collective_fusion.3
  %rs = f32[2,16] fusion(f32[8,16] %g), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (s32[], f32[8]) tuple(%i, %v)
}

%inner (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ags = (f32[4], f32[16]) all-gather-start(f32[4]{0} %v), channel_id=11, dimensions={0}
  %agd = f32[16] all-gather-done((f32[4], f32[16]) %ags)
  ROOT %t = (s32[], f32[8]) tuple(%i, %v)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %w1 = (s32[], f32[8]) while((s32[], f32[8]) %t0), condition=%cond, body=%body
  %w2 = (s32[], f32[8]) while((s32[], f32[8]) %t1), condition=%c2, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %ar = f32[8]{0} all-reduce(f32[8]{0} %a), channel_id=12, to_apply=%add
  ROOT %r = f32[8] copy(%a)
}
"""  # noqa: E501


def test_collectives_per_step():
    rows, unknown = compiled.collectives(HLO)
    got = {(r.op, r.dtype): (r.count, r.bytes, r.async_count) for r in rows}
    assert not unknown
    assert got == {
        ("all-gather", "bf16"): (6, 6 * 8 * 64 * 2, 6),  # 6 iterations, counted once each
        ("reduce-scatter", "f32"): (6, 6 * 8 * 16 * 4, 0),
        ("all-gather", "f32"): (3, 3 * 16 * 4, 3),
        ("all-reduce", "f32"): (1, 8 * 4, 0),
    }
    assert compiled.kernel_calls(HLO) == {}
    assert compiled.kernel_calls('custom_call_target="tpu_custom_call" x 2') == {"splash": 1}


def _mesh_of(platform_devices):
    return Mesh(np.asarray(platform_devices).reshape(1, len(platform_devices), 1),
                sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)  # fmt: skip


def test_kernel_follows_the_compiled_platform():
    """``auto`` and a named kernel resolve from the mesh's platform: Mosaic splash for TPU devices
    even when the machine's backend is a CPU; interpret mode only on a CPU."""
    tpu = targets.compile_only_devices(targets.parse_target("v5p-8"))
    rules = sharding.resolve_rules("fsdp")
    with sharding.use_mesh(_mesh_of(tpu), rules):
        assert sharding.compute_platform() == "tpu"
        path = choose_attention("auto", dtype=jnp.float32, head_dim=32)
        assert (path.kernel, path.interpret) == ("splash", False)
        assert not choose_attention("splash", dtype=jnp.bfloat16, head_dim=32).interpret
    with sharding.use_mesh(_mesh_of(jax.devices()[:2]), rules):
        assert sharding.compute_platform() == "cpu"
        assert choose_attention("auto", dtype=jnp.bfloat16, head_dim=32).kernel == "xla"
        assert choose_attention("splash", dtype=jnp.bfloat16, head_dim=32).interpret


def test_hybrid_mesh_keeps_tensor_inside_a_slice():
    """Two v5p slices: the slices go on data first, then on fsdp; tensor stays in one slice."""
    devs = targets.compile_only_devices(targets.parse_target("v5p-8", slices=2))
    mesh = sharding.target_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devs, granules=2)
    arr = mesh.devices
    for f in range(4):
        assert len({d.slice_index for d in arr[0, f, :]}) == 1
    assert {d.slice_index for d in arr[0, :, 0]} == {0, 1}
    with pytest.raises(sharding.ShardingError, match="make data or fsdp a multiple of 2"):
        sharding.target_mesh({"data": 1, "fsdp": 1, "tensor": 8}, devs, granules=2)
