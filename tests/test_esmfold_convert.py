"""ESMFold weight conversion: HF folders (safetensors and .bin), fair-esm-layout .pt files (+ the
separate ESM-2 .pt), ``export --to esmfold`` and its dimension check, and the safe-loading rule."""

import argparse
import os
import pickle

import jax
import numpy as np
import pytest
import torch
from support.esmfold_reference import converted, hf_model, numpy_state_dict

from esmjax import cli
from esmjax.io import checkpoint
from esmjax.io import convert_esm2 as convert
from esmjax.io.convert_esmfold import ConversionError, read_fairesm, read_hf
from esmjax.io.torch_pt import UnsafeCheckpointError


def _tree_equal(a, b, skip_lm_head=False):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(fa) == len(fb)
    for path, x in fa:
        if skip_lm_head and "'esm']['lm_head'" in jax.tree_util.keystr(path):
            continue
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(fb[path]), err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def reference_params():
    cfg, model = converted("small")
    return cfg, checkpoint.params_numpy(model)


def test_hf_safetensors_and_bin_folders(tmp_path, reference_params):
    cfg, params = reference_params
    ref = hf_model("small")
    ref.save_pretrained(tmp_path / "st")
    # transformers 5 writes only safetensors; a .bin folder is how older versions (and
    # facebook/esmfold_v1) ship.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert (tmp_path / "st" / "model.safetensors").exists() and (
        tmp_path / "bin" / "pytorch_model.bin"
    ).exists()
    for folder in ("st", "bin"):
        got_cfg, got = read_hf(tmp_path / folder)
        assert got_cfg.trunk == cfg.trunk and got_cfg.esm.num_layers == cfg.esm.num_layers
        got["esm"]["layers"]["self_attn"]["rot_emb"]["inv_freq"] = params["esm"]["layers"][
            "self_attn"
        ]["rot_emb"][
            "inv_freq"
        ]  # not stored by save_pretrained (recomputed), see test_esmfold_fold
        _tree_equal(got, params)


def _write_fairesm_pair(tmp_path, cfg, params, with_esm=False):
    """A fair-esm ESMFold .pt (cfg as fair-esm names, state dict without the LM) and the ESM-2
    .pt beside it."""
    sd = {
        k: torch.from_numpy(v.copy())
        for k, v in numpy_state_dict(hf_model("small")).items()
        if not k.startswith("esm.")
    }
    if with_esm:
        esm_sd = convert.params_to_state_dict(params["esm"], cfg.esm, "fair-esm")
        sd.update(
            {"esm." + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in esm_sd.items()}
        )
    sm = cfg.trunk.structure_module
    fair_cfg = {
        "esm_type": "esm2_tiny",
        "lddt_head_hid_dim": cfg.lddt_head_hid_dim,
        "trunk": {
            "num_blocks": cfg.trunk.num_blocks,
            "max_recycles": cfg.trunk.max_recycles,
            "structure_module": {"no_blocks": sm.num_blocks, "trans_scale_factor": 10},
        },
    }
    torch.save(
        {"cfg": {"model": argparse.Namespace(**fair_cfg)}, "model": sd},
        tmp_path / "esmfold_tiny.pt",
    )
    convert.write_fairesm(params["esm"], cfg.esm, tmp_path / "esm2_tiny.pt")


def test_fairesm_pt_with_separate_language_model(tmp_path, reference_params):
    cfg, params = reference_params
    _write_fairesm_pair(tmp_path, cfg, params)
    assert (
        cli.main(
            [
                "convert",
                str(tmp_path / "esmfold_tiny.pt"),
                str(tmp_path / "out"),
                "--esm",
                str(tmp_path / "esm2_tiny.pt"),
            ]
        )
        == 0
    )
    model, step = checkpoint.load_esmfold(tmp_path / "out")
    assert (
        step == 0 and model.cfg.trunk == cfg.trunk
    )  # num_blocks / max_recycles from cfg, widths from shapes
    _tree_equal(checkpoint.params_numpy(model), params)
    with pytest.raises(ConversionError, match="pass --esm"):
        read_fairesm(tmp_path / "esmfold_tiny.pt")


def test_fairesm_pt_holding_its_language_model(tmp_path, reference_params):
    cfg, params = reference_params
    _write_fairesm_pair(tmp_path, cfg, params, with_esm=True)
    # Its LM's shape (2 layers, width 32) is a preset, which gives the head count: no --esm needed.
    got_cfg, got = read_fairesm(tmp_path / "esmfold_tiny.pt")
    assert got_cfg.esm.num_heads == cfg.esm.num_heads
    _tree_equal(got, params)


def test_export_to_esmfold_and_dimension_check(tmp_path, reference_params):
    cfg, params = reference_params
    checkpoint.save_converted(tmp_path / "head", cfg, params)
    # An "esmjax-trained" ESM-2 of the same shape, with different weights.
    esm_params = jax.tree.map(lambda x: x * 1.5, params["esm"])
    checkpoint.save_converted(tmp_path / "lm", cfg.esm, esm_params)
    assert (
        cli.main(
            [
                "export",
                str(tmp_path / "lm"),
                str(tmp_path / "out"),
                "--to",
                "esmfold",
                "--folding-head",
                str(tmp_path / "head"),
            ]
        )
        == 0
    )
    model, _ = checkpoint.load_esmfold(tmp_path / "out")
    got = checkpoint.params_numpy(model)
    _tree_equal(got["esm"], esm_params)
    _tree_equal(got["trunk"], params["trunk"])
    # A stem of another width cannot feed this head: a clear, one-line error.
    from flax import nnx

    from esmjax.config import esm2_from_shape
    from esmjax.models.esm2 import ESM2

    other = esm2_from_shape(2, 48, 4)
    checkpoint.save_converted(
        tmp_path / "lm48", other, checkpoint.params_numpy(ESM2(other, rngs=nnx.Rngs(0)))
    )
    rc = cli.main(
        [
            "export",
            str(tmp_path / "lm48"),
            str(tmp_path / "bad"),
            "--to",
            "esmfold",
            "--folding-head",
            str(tmp_path / "head"),
        ]
    )
    assert rc == 2 and not (tmp_path / "bad").exists()
    with pytest.raises(
        ConversionError,
        match="expects an ESM-2 with 2 layers of width 32.*has 2 layers of width 48",
    ):
        convert_esmfold_check(cfg, other)


def convert_esmfold_check(cfg, other):
    from esmjax.io.convert_esmfold import check_fit

    check_fit(cfg, other, "lm48")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_no_code_from_a_checkpoint_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = {
        "cfg": {"model": _Exploit()},
        "model": {"trunk.blocks.0.layernorm_1.weight": torch.zeros(4)},
    }
    torch.save(payload, tmp_path / "evil_esmfold.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|refusing"):
        read_fairesm(tmp_path / "evil_esmfold.pt")
    assert cli.main(["convert", str(tmp_path / "evil_esmfold.pt"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_omegaconf_config_reads_as_inert_records(tmp_path, reference_params):
    """fair-esm's own ESMFold files pickle an OmegaConf config; it loads as data, and no
    OmegaConf code runs."""
    omegaconf = pytest.importorskip("omegaconf")
    cfg, params = reference_params
    sd = {
        k: torch.from_numpy(v.copy())
        for k, v in numpy_state_dict(hf_model("small")).items()
        if not k.startswith("esm.")
    }
    fair = omegaconf.OmegaConf.create(
        {
            "esm_type": "esm2_tiny",
            "trunk": {"num_blocks": 2, "max_recycles": 2, "structure_module": {"no_blocks": 3}},
        }
    )
    torch.save({"cfg": {"model": fair}, "model": sd}, tmp_path / "esmfold_oc.pt")
    convert.write_fairesm(params["esm"], cfg.esm, tmp_path / "esm2_tiny.pt")
    got_cfg, _ = read_fairesm(tmp_path / "esmfold_oc.pt", esm=tmp_path / "esm2_tiny.pt")
    assert got_cfg.trunk.max_recycles == 2 and got_cfg.trunk.structure_module.num_blocks == 3
