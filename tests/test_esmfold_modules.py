"""ESMFold pieces against HF ``EsmForProteinFolding`` submodules with random weights (fp32; 1e-5 of
the reference's scale for simple modules, 1e-4 for composite ones), plus geometry and residue
constants against OpenFold's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from support.esmfold_reference import converted, hf_model, load_module, rel_err

from esmjax.models.esmfold.config import StructureModuleConfig, TrunkConfig
from esmjax.models.esmfold.model import AF2_TO_ESM, lm_tokens
from esmjax.models.esmfold.structure import InvariantPointAttention, StructureModule
from esmjax.models.esmfold.triangle import (
    TriangleAttention,
    TriangleMultiplication,
    cpu_row_chunk,
)
from esmjax.models.esmfold.trunk import ResidueMLP, TriangularSelfAttentionBlock, recycle_bins
from esmjax.models.geometry import all_atom
from esmjax.models.geometry import residue_constants as rc
from esmjax.models.geometry.rigid import Rigid3, Rot3, Vec3, compose_quat_update

SIMPLE, COMPOSITE = 1e-5, 1e-4
B, L = 2, 13


@pytest.fixture(scope="module")
def ref():
    return hf_model("small")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    mask = np.ones((B, L), np.float32)
    mask[1, 9:] = 0
    aa = rng.integers(0, 21, (B, L)) * mask.astype(np.int64)
    return dict(
        rng=rng,
        mask=mask,
        aa=aa,
        s=rng.standard_normal((B, L, 64)).astype(np.float32),
        z=rng.standard_normal((B, L, L, 32)).astype(np.float32),
    )


def _pair_mask(mask):
    m = torch.from_numpy(mask)
    return m[:, :, None] * m[:, None, :]


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_triangle_multiplication(ref, inputs, outgoing):
    theirs = ref.trunk.blocks[0].tri_mul_out if outgoing else ref.trunk.blocks[0].tri_mul_in
    ours = load_module(
        nnx.eval_shape(lambda: TriangleMultiplication(32, outgoing=outgoing, rngs=nnx.Rngs(0))),
        theirs,
    )
    tm = _pair_mask(inputs["mask"])
    with torch.no_grad():
        want = theirs(torch.from_numpy(inputs["z"]), mask=tm).numpy()
    assert rel_err(ours(jnp.asarray(inputs["z"]), jnp.asarray(tm.numpy())), want) < SIMPLE


def test_pair_transition_in_position_blocks(ref):
    """The pair MLP over more positions than one CPU block (37 x 37 = 1,024 + 345 rows, so a
    remainder block too) runs blocked (a scan in its program) and equals HF's ``ResidueMLP``."""
    theirs = ref.trunk.blocks[0].mlp_pair
    ours = load_module(nnx.eval_shape(lambda: ResidueMLP(32, 128, rngs=nnx.Rngs(0))), theirs)
    z = np.random.default_rng(1).standard_normal((1, 37, 37, 32)).astype(np.float32)
    assert "scan" in str(jax.make_jaxpr(ours)(jnp.asarray(z)))
    with torch.no_grad():
        want = theirs(torch.from_numpy(z)).numpy()
    assert rel_err(ours(jnp.asarray(z)), want) < SIMPLE


@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_triangle_attention_and_chunking(ref, inputs, starting):
    theirs = ref.trunk.blocks[1].tri_att_start if starting else ref.trunk.blocks[1].tri_att_end
    shape = lambda: TriangleAttention(32, 16, 2, starting=starting, rngs=nnx.Rngs(0))  # noqa: E731
    ours = load_module(nnx.eval_shape(shape), theirs)
    tm = _pair_mask(inputs["mask"])
    with torch.no_grad():
        want = theirs(torch.from_numpy(inputs["z"]), mask=tm).numpy()
    z, m = jnp.asarray(inputs["z"]), jnp.asarray(tm.numpy())
    full = np.asarray(ours(z, m))
    assert rel_err(full, want) < SIMPLE
    for chunk in (5,):  # 5 does not divide 13: a remainder chunk
        np.testing.assert_allclose(
            np.asarray(ours(z, m, chunk_size=chunk)), full, rtol=0, atol=1e-6
        )


def test_triangle_attention_beyond_256_residues_runs_in_cpu_row_chunks(ref):
    """Beyond 256 residues a CPU runs triangle attention in row chunks (a scan in its program; 261
    rows at 2 heads: chunks of 15, with a remainder chunk), equal to HF's module, and a smaller
    ``chunk_size`` still caps the chunk."""
    theirs = ref.trunk.blocks[1].tri_att_start
    shape = lambda: TriangleAttention(32, 16, 2, starting=True, rngs=nnx.Rngs(0))  # noqa: E731
    ours = load_module(nnx.eval_shape(shape), theirs)
    n = 261
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, n, n, 32)).astype(np.float32)
    mask = np.ones((1, n), np.float32)
    mask[0, 250:] = 0
    tm = _pair_mask(mask)
    assert cpu_row_chunk(1, n, 2, None) == 15 and cpu_row_chunk(1, n, 2, 4) == 4
    assert cpu_row_chunk(1, 256, 2, None) is None and cpu_row_chunk(1, 256, 2, 7) == 7
    zj, mj = jnp.asarray(z), jnp.asarray(tm.numpy())
    assert "scan" in str(jax.make_jaxpr(lambda a, b: ours(a, b))(zj, mj))
    with torch.no_grad():
        want = theirs(torch.from_numpy(z), mask=tm).numpy()
    assert rel_err(ours(zj, mj), want) < SIMPLE


def test_block_parts_and_every_trunk_block(ref, inputs):
    """Sequence attention, seq->pair, pair->seq in isolation; then each block's (s, z) against
    the HF block."""
    cfg, model = converted("small")
    graphdef, stacked = nnx.split(model.trunk.blocks)
    s, z, mask = inputs["s"], inputs["z"], inputs["mask"]
    m = torch.from_numpy(mask)
    for i, theirs in enumerate(ref.trunk.blocks):
        block = nnx.merge(graphdef, jax_slice(stacked, i))
        with torch.no_grad():
            bias = theirs.pair_to_sequence(torch.from_numpy(z))
            att = theirs.seq_attention(torch.from_numpy(s), mask=m.bool(), bias=bias)[0].numpy()
            s2p = theirs.sequence_to_pair(torch.from_numpy(s)).numpy()
            s_ref, z_ref = theirs(torch.from_numpy(s), torch.from_numpy(z), mask=m)
        our_bias = block.pair_to_sequence(jnp.asarray(z))
        assert rel_err(our_bias, bias.numpy()) < SIMPLE
        keep = mask > 0
        our_att = np.asarray(block.seq_attention(jnp.asarray(s), jnp.asarray(mask), our_bias))
        assert rel_err(our_att[keep], att[keep]) < SIMPLE
        assert rel_err(block.sequence_to_pair(jnp.asarray(s)), s2p) < SIMPLE
        s_out, z_out = block(jnp.asarray(s), jnp.asarray(z), jnp.asarray(mask))
        assert rel_err(np.asarray(s_out)[keep], s_ref.numpy()[keep]) < COMPOSITE, i
        k2 = keep[:, :, None] & keep[:, None, :]
        assert rel_err(np.asarray(z_out)[k2], z_ref.numpy()[k2]) < COMPOSITE, i
        s, z = np.asarray(s_out), np.asarray(z_out)  # feed block i's output to block i + 1


def jax_slice(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_block_stack_names_match_hf(ref):
    """Every HF block key exists in the stacked block module (``load_module`` raises on any
    unused key)."""
    cfg, _ = converted("small")
    ours = nnx.eval_shape(lambda: TriangularSelfAttentionBlock(cfg.trunk, rngs=nnx.Rngs(0)))
    load_module(ours, ref.trunk.blocks[0])


def _frames(rng, shape):
    q = rng.standard_normal(shape + (4,)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return q, (3 * rng.standard_normal(shape + (3,))).astype(np.float32)


def test_invariant_point_attention(ref, inputs):
    from transformers.models.esm.openfold_utils import Rigid, Rotation

    theirs = ref.trunk.structure_module.ipa
    sm_cfg = converted("small")[0].trunk.structure_module
    ours = load_module(
        nnx.eval_shape(lambda: InvariantPointAttention(sm_cfg, rngs=nnx.Rngs(0))), theirs
    )
    rng = inputs["rng"]
    s = rng.standard_normal((B, L, 32)).astype(np.float32)
    z = rng.standard_normal((B, L, L, 16)).astype(np.float32)
    q, t = _frames(rng, (B, L))
    with torch.no_grad():
        r = Rigid(Rotation(quats=torch.from_numpy(q)), torch.from_numpy(t))
        want = theirs(
            torch.from_numpy(s), torch.from_numpy(z), r, torch.from_numpy(inputs["mask"])
        ).numpy()
    frames = Rigid3(Rot3.from_quaternion(jnp.asarray(q)), Vec3.from_array(jnp.asarray(t)))
    got = ours(jnp.asarray(s), jnp.asarray(z), frames, jnp.asarray(inputs["mask"]))
    assert rel_err(got, want) < COMPOSITE


def test_structure_module_every_iteration(ref, inputs):
    theirs = ref.trunk.structure_module
    sm_cfg = converted("small")[0].trunk.structure_module
    ours = load_module(nnx.eval_shape(lambda: StructureModule(sm_cfg, rngs=nnx.Rngs(0))), theirs)
    rng = inputs["rng"]
    single = rng.standard_normal((B, L, 32)).astype(np.float32)
    pair = rng.standard_normal((B, L, L, 16)).astype(np.float32)
    aa, mask = inputs["aa"], inputs["mask"]
    with torch.no_grad():
        want = theirs(
            {"single": torch.from_numpy(single), "pair": torch.from_numpy(pair)},
            torch.from_numpy(aa),
            torch.from_numpy(mask),
        )
    got = ours(jnp.asarray(single), jnp.asarray(pair), jnp.asarray(aa), jnp.asarray(mask))
    keep = mask > 0
    for k in ("frames", "sidechain_frames", "unnormalized_angles", "angles", "positions", "states"):
        assert got[k].shape == tuple(want[k].shape), k
        for it in range(sm_cfg.num_blocks):  # every iteration, not only the last
            assert rel_err(np.asarray(got[k][it])[keep], want[k][it].numpy()[keep]) < COMPOSITE, (
                k,
                it,
            )
    assert (
        np.abs(np.asarray(got["positions"])[:, keep] - want["positions"].numpy()[:, keep]).max()
        < 1e-3
    )


def test_recycle_bins_match_reference(inputs):
    from transformers.models.esm.modeling_esmfold import EsmFoldingTrunk

    rng = inputs["rng"]
    atoms = (8 * rng.standard_normal((B, L, 14, 3))).astype(np.float32)
    want = EsmFoldingTrunk.distogram(torch.from_numpy(atoms[:, :, :3]), 3.375, 21.375, 15).numpy()
    got = np.asarray(recycle_bins(jnp.asarray(atoms)))
    np.testing.assert_array_equal(got, want)
    assert got.max() == 14 and got.min() == 0


def test_lm_input_construction(ref, inputs):
    assert np.array_equal(ref.af2_to_esm.numpy(), AF2_TO_ESM)
    aa, mask = inputs["aa"], inputs["mask"]
    esmaa = ref.af2_idx_to_esm_idx(torch.from_numpy(aa), torch.from_numpy(mask).long())
    bos = torch.zeros((B, 1), dtype=torch.long)
    pad = torch.ones((B, 1), dtype=torch.long)
    want = torch.cat([bos, esmaa, pad], 1)
    want[range(B), (want != 1).sum(1)] = 2
    assert np.array_equal(np.asarray(lm_tokens(jnp.asarray(aa), jnp.asarray(mask))), want.numpy())


def test_residue_constants_equal_openfold():
    from transformers.models.esm.openfold_utils import residue_constants as of
    from transformers.models.esm.openfold_utils.data_transforms import make_atom14_masks

    np.testing.assert_array_equal(rc.RESTYPE_DEFAULT_FRAMES, of.restype_rigid_group_default_frame)
    np.testing.assert_array_equal(rc.RESTYPE_ATOM14_TO_GROUP, of.restype_atom14_to_rigid_group)
    np.testing.assert_array_equal(rc.RESTYPE_ATOM14_MASK, of.restype_atom14_mask)
    np.testing.assert_array_equal(
        rc.RESTYPE_ATOM14_POSITIONS, of.restype_atom14_rigid_group_positions
    )
    masks = make_atom14_masks({"aatype": torch.arange(21)})
    np.testing.assert_array_equal(
        rc.RESTYPE_ATOM37_TO_ATOM14, masks["residx_atom37_to_atom14"].numpy()
    )
    np.testing.assert_array_equal(
        rc.RESTYPE_ATOM14_TO_ATOM37, masks["residx_atom14_to_atom37"].numpy()
    )
    np.testing.assert_array_equal(rc.RESTYPE_ATOM37_MASK, masks["atom37_atom_exists"].numpy())
    assert rc.ATOM_TYPES == tuple(of.atom_types) and rc.RESTYPES == tuple(of.restypes)


def test_all_atom_against_openfold(inputs):
    from transformers.models.esm.openfold_utils import Rigid, Rotation, feats
    from transformers.models.esm.openfold_utils import residue_constants as of

    rng = inputs["rng"]
    aa = np.arange(21).reshape(1, 21)
    q, t = _frames(rng, (1, 21))
    angles = rng.standard_normal((1, 21, 7, 2)).astype(np.float32)
    angles /= np.linalg.norm(angles, axis=-1, keepdims=True)
    with torch.no_grad():
        r = Rigid(
            Rotation(rot_mats=Rotation(quats=torch.from_numpy(q)).get_rot_mats()),
            torch.from_numpy(t),
        )
        frames = feats.torsion_angles_to_frames(
            r,
            torch.from_numpy(angles),
            torch.from_numpy(aa),
            torch.tensor(of.restype_rigid_group_default_frame),
        )
        atoms = feats.frames_and_literature_positions_to_atom14_pos(
            frames,
            torch.from_numpy(aa),
            torch.tensor(of.restype_rigid_group_default_frame),
            torch.tensor(of.restype_atom14_to_rigid_group),
            torch.tensor(of.restype_atom14_mask),
            torch.tensor(of.restype_atom14_rigid_group_positions),
        )
    ours_bb = Rigid3(Rot3.from_quaternion(jnp.asarray(q)), Vec3.from_array(jnp.asarray(t)))
    groups = all_atom.torsion_angles_to_frames(ours_bb, jnp.asarray(angles), jnp.asarray(aa))
    assert rel_err(groups.to_tensor_4x4(), frames.to_tensor_4x4().numpy()) < SIMPLE
    ours_atoms = all_atom.frames_to_atom14(groups, jnp.asarray(aa))
    assert np.abs(np.asarray(ours_atoms) - atoms.numpy()).max() < 1e-5
    atom37 = all_atom.atom14_to_atom37(ours_atoms, jnp.asarray(aa), jnp.ones((1, 21)))
    n, ca = rc.ATOM_ORDER["N"], rc.ATOM_ORDER["CA"]
    np.testing.assert_array_equal(np.asarray(atom37)[0, :20, ca], np.asarray(ours_atoms)[0, :20, 1])
    np.testing.assert_array_equal(np.asarray(atom37)[0, :20, n], np.asarray(ours_atoms)[0, :20, 0])
    assert np.all(np.asarray(atom37)[0, 20] == 0)  # X has no atoms


def test_rigid_algebra(inputs):
    rng = inputs["rng"]
    q, t = _frames(rng, (5,))
    rot = Rot3.from_quaternion(jnp.asarray(q))
    m = np.asarray(rot.to_array())
    np.testing.assert_allclose(
        m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(3), (5, 3, 3)), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(Rot3.from_quaternion(-jnp.asarray(q)).to_array()), m, atol=1e-6
    )
    frame = Rigid3(rot, Vec3.from_array(jnp.asarray(t)))
    p = Vec3.from_array(jnp.asarray(rng.standard_normal((5, 3)), jnp.float32))
    np.testing.assert_allclose(
        np.asarray(frame.apply_inverse(frame.apply(p)).to_array()),
        np.asarray(p.to_array()),
        atol=1e-5,
    )
    # Quaternion update: zero update keeps the frame; its translation is rotated by the old
    # rotation.
    upd = np.zeros((5, 6), np.float32)
    upd[:, 3:] = [1.0, 0.0, 0.0]
    q2, t2 = compose_quat_update(jnp.asarray(q), frame.trans, jnp.asarray(upd))
    np.testing.assert_allclose(np.asarray(q2), q, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t2.to_array()), t + m[:, :, 0], atol=1e-5)


def test_configs_validate():
    with pytest.raises(ValueError):
        TrunkConfig(single_dim=30, single_head_width=16)
    assert StructureModuleConfig().num_blocks == 8 and TrunkConfig().max_recycles == 4
