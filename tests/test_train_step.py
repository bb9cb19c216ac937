"""The train step: sharded over 8 devices (fsdp_tp) equals one device; accumulation equals one
big batch."""

import dataclasses

import jax
import numpy as np

from esmjax.config import ESM2_PRESETS, MeshConfig, OptimConfig
from esmjax.data.masking import mask_tokens
from esmjax.models.alphabet import batch_encode
from esmjax.models.esm2 import abstract_model
from esmjax.parallel import sharding as shd
from esmjax.train.optim import learning_rate, make_optimizer, trainable
from esmjax.train.state import create_state, model_graphdef, state_shardings
from esmjax.train.step import make_train_step

CFG = dataclasses.replace(ESM2_PRESETS["tiny_h3"], num_heads=4)  # heads divisible by tensor=2
OPT = OptimConfig(peak_lr=4e-4, warmup_steps=1, weight_decay=0.1)


def _batch(rows=8, accum=1, seed=0):
    rng = np.random.default_rng(seed)
    aa = "ACDEFGHIKLMNPQRSTVWY"
    seqs = ["".join(rng.choice(list(aa), size=rng.integers(10, 30))) for _ in range(rows * accum)]
    toks = batch_encode(seqs, pad_to=32)
    m = mask_tokens(toks, rng, mask_prob=0.3)
    seg = (toks != 1).astype(np.int32)
    pos = np.broadcast_to(np.arange(32, dtype=np.int32), toks.shape).copy()
    b = {**m, "segment_ids": seg, "positions": pos}
    return {k: v.reshape(accum, rows, 32) for k, v in b.items()}


def _run(mesh_cfg, rules_name, batch):
    mesh = shd.make_mesh(
        mesh_cfg,
        jax.devices()[: np.prod([mesh_cfg.ici_data, mesh_cfg.ici_fsdp, mesh_cfg.ici_tensor])],
    )
    rules = shd.resolve_rules(rules_name)
    tx = make_optimizer(OPT, 10, abstract_model(CFG)[1].to_pure_dict())
    shardings = state_shardings(CFG, tx, mesh, rules)
    with shd.use_mesh(mesh, rules):
        state = create_state(CFG, tx, shardings, seed=3)
        spec = jax.sharding.PartitionSpec(None, *shd.batch_sharding(mesh, rules, 2).spec)
        bs = jax.sharding.NamedSharding(mesh, spec)
        step = jax.jit(
            make_train_step(model_graphdef(CFG), tx, learning_rate(OPT, 10)),
            in_shardings=(shardings, bs),
            out_shardings=(shardings, None),
        )
        new, metrics = step(state, jax.device_put(batch, bs))
        # the second step exercises the optimizer's moments as well
        new, metrics2 = step(new, jax.device_put(batch, bs))
    return jax.device_get(new.variables), jax.device_get(metrics), jax.device_get(metrics2), new


def test_sharded_step_equals_single_device():
    batch = _batch()
    v1, m1, m1b, _ = _run(MeshConfig(ici_data=1, ici_fsdp=1, ici_tensor=1), "fsdp_tp", batch)
    v8, m8, m8b, state8 = _run(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2), "fsdp_tp", batch)
    # Parameters really are split over the mesh.
    q = state8.variables["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert abs(m1["loss"] - m8["loss"]) < 1e-5 and abs(m1b["loss"] - m8b["loss"]) < 1e-5
    for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v8)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_accumulation_equals_one_big_batch():
    big = _batch(rows=8, accum=1, seed=5)
    split = {k: v.reshape(2, 4, 32) for k, v in big.items()}
    mesh = MeshConfig(ici_data=1, ici_fsdp=4, ici_tensor=1)
    va, ma, _, _ = _run(mesh, "fsdp", big)
    vb, mb, _, _ = _run(mesh, "fsdp", split)
    assert abs(ma["loss"] - mb["loss"]) < 1e-6
    assert abs(ma["grad_norm"] - mb["grad_norm"]) < 1e-6 * ma["grad_norm"]
    # Parameters: the 1e-5 of the sharded test. Adam divides each gradient by its own magnitude, so
    # an element
    # whose gradient is ~1e-6 of the scale moves by a full step whatever its last digits; the
    # gradients themselves
    # agree to ~2e-7 of their scale (test_accumulated_gradients_equal_full_batch).
    for a, b in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_accumulated_gradients_equal_full_batch():
    from esmjax.train.step import mlm_sums

    big = _batch(rows=8, accum=1, seed=5)
    graphdef = model_graphdef(CFG)
    from flax import nnx

    from esmjax.models.esm2 import ESM2

    variables = nnx.state(ESM2(CFG, rngs=nnx.Rngs(3))).to_pure_dict()
    grad = jax.jit(jax.grad(lambda v, b: mlm_sums(graphdef, v, b)["loss_sum"]))
    full = grad(variables, {k: v[0] for k, v in big.items()})
    halves = [grad(variables, {k: v[0, i : i + 4] for k, v in big.items()}) for i in (0, 4)]
    for a, b, c in zip(
        jax.tree.leaves(full), jax.tree.leaves(halves[0]), jax.tree.leaves(halves[1])
    ):
        scale = max(float(np.abs(a).max()), 1e-12)
        assert float(np.abs(a - (b + c)).max()) <= 1e-6 * scale


def test_one_step_trains_key_bias_not_inv_freq():
    """One optimizer step leaves the rotary inv_freq buffers unchanged and moves the attention key
    bias (a real parameter under rotary embeddings: its gradient matches fair-esm's,
    test_grad_parity.py)."""
    variables = abstract_model(CFG)[1].to_pure_dict()
    labels = jax.tree_util.tree_map_with_path(trainable, variables)
    attn_labels = labels["layers"]["self_attn"]
    assert attn_labels["rot_emb"]["inv_freq"] == "frozen"
    assert attn_labels["k_proj"]["bias"] == "no_decay"
    assert attn_labels["k_proj"]["kernel"] == "decay"
    frozen = [p for p, x in jax.tree_util.tree_leaves_with_path(labels) if x == "frozen"]
    assert [jax.tree_util.keystr(p) for p in frozen] == [
        "['layers']['self_attn']['rot_emb']['inv_freq']"
    ]
    mesh = shd.make_mesh(MeshConfig(ici_data=1, ici_fsdp=2, ici_tensor=1), jax.devices()[:2])
    rules = shd.resolve_rules("fsdp")
    tx = make_optimizer(OPT, 10, variables)
    shardings = state_shardings(CFG, tx, mesh, rules)
    with shd.use_mesh(mesh, rules):
        state = create_state(CFG, tx, shardings, seed=3)
        before = jax.device_get(state.variables)
        step = jax.jit(make_train_step(model_graphdef(CFG), tx, learning_rate(OPT, 10)))
        batch = jax.tree.map(lambda x: x[:, :2], _batch())
        state, _ = step(state, batch)
    after = jax.device_get(state.variables)
    attn_b, attn_a = before["layers"]["self_attn"], after["layers"]["self_attn"]
    np.testing.assert_array_equal(attn_b["rot_emb"]["inv_freq"], attn_a["rot_emb"]["inv_freq"])
    # Adam's first step moves an element by about the learning rate unless its gradient is near
    # eps: the lowest-frequency rotary pairs barely turn over a 32-token row, so their key-bias
    # components are almost cancelled by the softmax and move less, but every element moves.
    moved = np.abs(attn_a["k_proj"]["bias"] - attn_b["k_proj"]["bias"])
    assert moved.shape == (CFG.num_layers, CFG.num_heads, CFG.head_dim)
    assert (moved > 0).all() and moved.max() > 0.9 * learning_rate(OPT, 10)(0), moved
    assert not np.array_equal(attn_b["q_proj"]["bias"], attn_a["q_proj"]["bias"])
