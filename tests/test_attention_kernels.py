"""The packed flash-attention kernels (TPU splash, Pallas GPU) in Pallas interpret mode against the
reference XLA attention, forward and gradient; the choice of path; the model on a kernel path.

Interpret mode runs each kernel body as ordinary JAX ops on the CPU (no Triton / Mosaic lowering),
so these check the kernels' tiling, segment masking and backward math, at fp32 tolerance.
"""

import dataclasses
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.reference import rel_err

from esmjax.config import ESM2_PRESETS, ESM2Config, MeshConfig, from_dict
from esmjax.errors import InputError
from esmjax.models import alphabet as tok
from esmjax.models import attention
from esmjax.models import layers as nn
from esmjax.models.attention import kernels, xla
from esmjax.models.esm2 import ESM2
from esmjax.parallel import sharding as shd

KERNELS = {"splash": kernels.splash_attention, "pallas_gpu": kernels.pallas_gpu_attention}
L, H, D = 64, 2, 16


def packed_segments(counts, length, seed=0):
    """[len(counts), length] segment ids: row i holds counts[i] segments of random lengths, then
    padding (a row with 0 segments is fully padded)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((len(counts), length), np.int32)
    for i, n in enumerate(counts):
        if n == 0:
            continue
        cuts = np.sort(rng.choice(np.arange(1, length - 4), n, replace=False))
        lens = np.diff(np.r_[0, cuts])
        off = 0
        for s, m in enumerate(lens):
            seg[i, off : off + m] = s + 1
            off += m
    return seg


def qkv(b, length=L, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal((b, length, H, D)), jnp.float32) * (0.25 if i == 0 else 1)
        for i in range(3)
    )


def reference(q, k, v, seg):
    return xla.dot_product_attention(q, k, v, xla.attention_mask(seg), return_weights=False)[0]


# 1, 2, 5 and 8 segments with trailing padding, one fully padded row, one row without padding.
COUNTS = (1, 2, 5, 8, 0)


def _segs():
    seg = packed_segments(COUNTS, L)
    full = np.ones((1, L), np.int32)
    full[0, L // 3 :] = 2
    return jnp.asarray(np.concatenate([seg, full]))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_forward_matches_reference(name):
    seg = _segs()
    q, k, v = qkv(seg.shape[0])
    out = np.asarray(jax.jit(lambda *a: KERNELS[name](*a, interpret=True))(q, k, v, seg))
    ref = np.asarray(reference(q, k, v, seg))
    real = np.asarray(seg) > 0
    assert np.isfinite(out).all()
    assert rel_err(out[real], ref[real]) < 2e-6
    assert not out[~real].any(), "padding queries must come out zero"


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_gradient_matches_reference(name):
    """d(q, k, v) of <out, g> with g zero at padding queries (the model's losses ignore them)."""
    seg = _segs()
    q, k, v = qkv(seg.shape[0])
    g = jax.random.normal(jax.random.key(3), q.shape) * (seg > 0)[..., None, None]

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v, seg), g), argnums=(0, 1, 2)))

    got = loss(lambda *a: KERNELS[name](*a, interpret=True))(q, k, v)
    want = loss(reference)(q, k, v)
    for a, b, what in zip(got, want, "qkv"):
        assert np.isfinite(np.asarray(a)).all(), what
        assert rel_err(a, b) < 1e-5, what


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_packed_row_equals_sequences_alone(name):
    """A kernel that ignored segment ids would mix the sequences of a row."""
    seg = packed_segments((6,), L, seed=5)
    q, k, v = qkv(1, seed=7)
    fn = jax.jit(lambda *a: KERNELS[name](*a, interpret=True))
    packed = np.asarray(fn(q, k, v, jnp.asarray(seg)))[0]
    for s in range(1, 7):
        idx = np.flatnonzero(seg[0] == s)
        alone_seg = np.zeros((1, L), np.int32)
        alone_seg[0, : len(idx)] = 1

        def alone(x, idx=idx):  # the segment moved to the start of its own padded row
            return jnp.zeros_like(x).at[0, : len(idx)].set(x[0, idx])

        out = np.asarray(fn(alone(q), alone(k), alone(v), jnp.asarray(alone_seg)))[0]
        assert rel_err(packed[idx], out[: len(idx)]) < 2e-6, s


def test_odd_length_is_padded_inside():
    """L not a multiple of the tile: rows are padded inside the kernel and cropped back."""
    seg = jnp.asarray(packed_segments((3, 1), 50, seed=2))
    q, k, v = qkv(2, length=50)
    ref = np.asarray(reference(q, k, v, seg))
    real = np.asarray(seg) > 0
    for name, fn in KERNELS.items():
        out = np.asarray(jax.jit(lambda *a, fn=fn: fn(*a, interpret=True))(q, k, v, seg))
        assert out.shape == ref.shape
        assert rel_err(out[real], ref[real]) < 2e-6, name


def test_choose_attention(caplog):
    f32, bf16 = jnp.float32, jnp.bfloat16
    pick = attention.choose_attention
    assert pick("auto", dtype=f32, head_dim=64) == pick("auto", dtype=f32, head_dim=64)
    assert pick("auto", dtype=f32, head_dim=64, backend="cpu").kernel == "xla"
    assert pick("auto", dtype=bf16, head_dim=64, backend="cpu").kernel == "xla"
    assert pick("auto", dtype=f32, head_dim=64, backend="tpu").kernel == "splash"
    assert pick("auto", dtype=bf16, head_dim=64, backend="gpu").kernel == "pallas_gpu"
    assert pick("auto", dtype=f32, head_dim=64, backend="gpu").kernel == "xla"
    assert pick("auto", dtype=bf16, head_dim=64, need_weights=True, backend="tpu").kernel == "xla"
    assert pick("splash", dtype=f32, head_dim=16, backend="tpu") == attention.AttentionPath(
        "splash", False, "model.attention=splash"
    )
    assert pick("splash", dtype=f32, head_dim=16, backend="cpu").interpret
    assert pick("pallas_gpu", dtype=f32, head_dim=16, backend="cpu").interpret
    assert not pick("pallas_gpu", dtype=bf16, head_dim=16, backend="gpu").interpret
    assert pick("cudnn", dtype=bf16, head_dim=64, backend="gpu").kernel == "cudnn"
    with pytest.raises(InputError, match="model.attention=cudnn"):
        pick("cudnn", dtype=f32, head_dim=64, backend="cpu")
    # Logged once per distinct choice, with the kernel and the reason.
    attention._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="esmjax.attention"):
        for _ in range(3):
            pick("auto", dtype=bf16, head_dim=64, backend="tpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "esmjax.attention"]
    assert lines == ["attention kernel: splash: auto: TPU backend"]


def test_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match=r"attention.*must be one of.*'flash'"):
        dataclasses.replace(ESM2_PRESETS["tiny"], attention="flash")
    with pytest.raises(ValueError, match=r"attention.*must be one of.*'flash'"):
        from_dict(ESM2Config, {"preset": "tiny", "attention": "flash"}, "model")
    assert from_dict(ESM2Config, {"preset": "tiny", "attention": "splash"}).attention == "splash"


def _packed_batch():
    seqs = ["MKTVRQERLKSIVRILERSKEPVSGAQ", "KALTA<mask>ISQPAA", "MKTVAC<mask>DE"]
    rows = [tok.encode_with_specials(s) for s in seqs]
    tokens = np.full((2, L), tok.PAD, np.int32)
    segs = np.zeros((2, L), np.int32)
    pos = np.zeros((2, L), np.int32)
    off = 0
    for i, r in enumerate(rows):  # row 0 packs all three, row 1 holds the first alone
        tokens[0, off : off + len(r)], segs[0, off : off + len(r)] = r, i + 1
        pos[0, off : off + len(r)] = np.arange(len(r))
        off += len(r)
    tokens[1, : len(rows[0])], segs[1, : len(rows[0])] = rows[0], 1
    pos[1, : len(rows[0])] = np.arange(len(rows[0]))
    return jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos)


def _models(name):
    xla_model = ESM2(ESM2_PRESETS["tiny_h3"], rngs=nnx.Rngs(1))
    cfg = dataclasses.replace(xla_model.cfg, attention=name)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ESM2(cfg, rngs=nnx.Rngs(0))))
    xla_gd, state = nnx.split(xla_model)
    return xla_gd, graphdef, state


def _logits(gd, st, batch):
    return nnx.merge(gd, st)(*batch)["logits"]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_model_on_kernel_path_matches_xla(name):
    """ESM2 with ``attention=<kernel>`` (interpret mode here) gives the XLA path's logits on the
    real tokens of packed rows."""
    xla_gd, graphdef, state = _models(name)
    batch = _packed_batch()
    real = np.asarray(batch[1]) > 0
    fwd = jax.jit(lambda gd, st: _logits(gd, st, batch), static_argnums=0)
    want = np.asarray(fwd(xla_gd, state))
    got = np.asarray(fwd(graphdef, state))
    assert rel_err(got[real], want[real]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_model_on_kernel_path_gradient_and_sharded(name):
    """The training gradient on a kernel path equals XLA's, and the kernel run per shard
    (``map_shards``: rows over ``data``) gives the same logits."""
    xla_gd, graphdef, state = _models(name)
    batch = _packed_batch()
    segs = batch[1]
    real = np.asarray(segs) > 0

    def loss(gd, st):
        lg = _logits(gd, st, batch)
        return jnp.sum(jnp.where(segs[..., None] > 0, jax.nn.log_softmax(lg), 0.0)[..., 5])

    g_want = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(xla_gd, state)
    g_got = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(graphdef, state)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_got), nnx.to_flat_state(g_want), strict=True):
        assert rel_err(a[...], b[...]) < 1e-4, path

    fwd = jax.jit(lambda gd, st: _logits(gd, st, batch), static_argnums=0)
    want = np.asarray(fwd(xla_gd, state))
    mesh = shd.make_mesh(MeshConfig(ici_data=2, ici_fsdp=1), jax.devices()[:2])
    with shd.use_mesh(mesh, shd.resolve_rules("fsdp_tp")):
        sharded = np.asarray(fwd(graphdef, state))
    assert rel_err(sharded[real], want[real]) < 1e-5


def _plain_attention(q, k, v, seg):
    """Softmax attention as autodiff sees it written out: masked scores replaced by the float32
    minimum, softmax over keys (a query with no allowed key gets uniform weights)."""
    s = jnp.einsum("blhd,bmhd->bhlm", q, k)
    s = jnp.where(xla.attention_mask(seg), s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("weights", [False, True], ids=["train", "weights"])
def test_xla_attention_matches_plain_softmax(weights):
    """The CPU path (additive mask bias, row-mapped, custom transposed backward) is the plain
    softmax attention, gradients included, with a cotangent that is nonzero at padding queries
    too: no gradient may reach the masked scores of a fully padded query."""
    seg = _segs()
    q, k, v = qkv(seg.shape[0])
    g = jax.random.normal(jax.random.key(4), q.shape)

    def ours(q, k, v, seg):
        mask = xla.attention_mask(seg)
        return xla.dot_product_attention(q, k, v, mask, return_weights=weights)[0]

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v, seg), g), argnums=(0, 1, 2)))

    assert rel_err(jax.jit(ours)(q, k, v, seg), _plain_attention(q, k, v, seg)) < 2e-6
    for a, b, what in zip(grads(ours)(q, k, v), grads(_plain_attention)(q, k, v), "qkv"):
        assert rel_err(a, b) < 2e-6, what


def test_long_rows_run_in_query_blocks_and_match_plain_softmax():
    """Beyond 256 tokens a CPU runs each row's queries in blocks of 64 (600 tokens: 10 blocks, the
    last padded): packed segments, a row whose tail is padding, and a fully padded row give the
    plain softmax attention, gradients included, with a cotangent nonzero everywhere."""
    n = 600
    seg = np.zeros((3, n), np.int32)
    seg[0, :300], seg[0, 300:580] = 1, 2
    seg[1, :450] = 1
    seg = jnp.asarray(seg)
    q, k, v = qkv(3, length=n, seed=5)
    g = jax.random.normal(jax.random.key(6), q.shape)

    def ours(q, k, v, seg):
        return xla.dot_product_attention(q, k, v, xla.attention_mask(seg), return_weights=False)[0]

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v, seg), g), argnums=(0, 1, 2)))

    hlo = grads(ours).lower(q, k, v).as_text()
    assert re.search(rf"tensor<10x(1x)?{H}x64x{D}xf32>", hlo)  # a row's queries as 10 blocks
    assert rel_err(jax.jit(ours)(q, k, v, seg), _plain_attention(q, k, v, seg)) < 2e-6
    for a, b, what in zip(grads(ours)(q, k, v), grads(_plain_attention)(q, k, v), "qkv"):
        assert rel_err(a, b) < 2e-6, what


@pytest.mark.parametrize("transposed_copy", [True, False], ids=["wide", "narrow"])
@pytest.mark.parametrize("gelu_input", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("n_in,out", [(1, (6,)), (1, (2, 3)), (2, (5,))])
def test_dense_matmul_gradient_matches_dot_general(
    n_in, out, gelu_input, transposed_copy, monkeypatch
):
    """``layers.matmul`` (on a CPU, a ``dot_general`` with its own backward: GELU recomputed once,
    from width 256 the weight gradient from a transposed input) equals ``dot_general`` of
    ``jax.nn.gelu`` and their autodiff, for q/k/v-like [E, H, D], out_proj-like [H, D, E] and
    fc2-like (GELU input) kernels, with and without the transposed copy."""
    monkeypatch.setattr(nn, "_CPU_MIN_WIDTH", 1 if transposed_copy else 10**6)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 7, *((4,) if n_in == 1 else (2, 3)))), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*x.shape[2:], *out)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 7, *out)), jnp.float32)
    lhs = tuple(range(2, x.ndim))

    def plain(x, w):
        a = jax.nn.gelu(x, approximate=False) if gelu_input else x
        return jax.lax.dot_general(a, w, ((lhs, tuple(range(n_in))), ((), ())))

    def ours(x, w):
        return nn.matmul(x, w, n_in, gelu_input)

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.vdot(fn(x, w), g), argnums=(0, 1)))

    assert rel_err(jax.jit(ours)(x, w), plain(x, w)) < 1e-6
    for a, b in zip(grads(ours)(x, w), grads(plain)(x, w)):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_value_and_gradient_match_autodiff(dtype):
    """``layers.gelu`` is fair-esm's ``x * 0.5 * (1 + erf(x / sqrt 2))``; its backward (``erf``
    evaluated once: ``Phi(x) + x phi(x)``) equals autodiff of that expression, and both agree with
    ``jax.nn.gelu(approximate=False)`` (the erfc form), over the range activations take and into
    both tails."""
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.array([-40.0, -6.5, 0.0, 6.5, 40.0])])
    x = x.astype(dtype)

    def fair_esm(x):
        return x * 0.5 * (1.0 + jax.lax.erf(x / np.sqrt(2.0).astype(dtype)))

    erfc_form = functools.partial(jax.nn.gelu, approximate=False)
    g = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), dtype)

    def value_and_grad(fn):
        f = jax.value_and_grad(lambda x: jnp.vdot(fn(x).astype(jnp.float32), g.astype(jnp.float32)))
        return jax.jit(lambda x: (fn(x), f(x)[1]))(x)

    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    ours = [np.asarray(a, np.float32) for a in value_and_grad(nn.gelu)]
    for ref in (fair_esm, erfc_form):
        for a, b in zip(ours, value_and_grad(ref)):
            np.testing.assert_allclose(a, np.asarray(b, np.float32), rtol=tol, atol=2 * tol)
