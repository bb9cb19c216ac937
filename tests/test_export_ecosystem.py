"""Exports as the PyTorch ecosystem loads them: HF recipes (``AutoTokenizer``,
``AutoModelFor*``, ``pipeline``) on ``export --to hf`` and the fine-tuning exports, and fair-esm's
``load_model_and_alphabet_local`` on ``export --to fair-esm``, the way its users call it."""

import argparse

import numpy as np
import pytest
from flax import nnx

from esmjax.cli import main as cli
from esmjax.config import FinetuneConfig, LoraConfig
from esmjax.inference import export
from esmjax.inference.task import Setup
from esmjax.io import checkpoint
from esmjax.models.alphabet import MASK, TOKENS, batch_encode
from esmjax.models.heads import TaskModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Real proteins (ubiquitin, the start of GFP, insulin B chain) and one with the rare letters.
SEQS = [
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
    "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCF",
    "FVNQHLCGSHLVEALYLVCGERGFFYTPKT",
    "MKXBZUOAC-.",
]


def _ours(ckpt, tokens: np.ndarray, contacts: bool = False) -> dict:
    model, _ = checkpoint.load_model(ckpt)
    return {k: np.asarray(v) for k, v in model(tokens, return_contacts=contacts).items()}


def test_hf_export_loads_with_autotokenizer_and_fill_mask_pipeline(ckpt, tmp_path):
    out = tmp_path / "hf"
    assert cli(["export", str(ckpt), str(out), "--to", "hf"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "EsmTokenizer" and tok.convert_ids_to_tokens(range(33)) == list(
        TOKENS
    )
    for seq in SEQS:
        assert tok(seq)["input_ids"] == batch_encode([seq])[0].tolist(), seq
    assert transformers.AutoModelForMaskedLM.from_pretrained(out).__class__.__name__ == (
        "EsmForMaskedLM"
    )

    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    sites = [(0, 5), (0, 40), (1, 12), (2, 20)]  # (sequence, residue) masked one at a time
    masked = [SEQS[i][:r] + "<mask>" + SEQS[i][r + 1 :] for i, r in sites]
    tokens = batch_encode(masked)
    ours = _ours(ckpt, tokens)["logits"]
    for j, text in enumerate(masked):
        pos = int(np.flatnonzero(tokens[j] == MASK)[0])
        best = fill(text, top_k=1)[0]
        assert best["token"] == int(ours[j, pos].argmax()), text


def _task_setup(ckpt, task: str) -> tuple[Setup, dict]:
    cfg = FinetuneConfig(
        backbone=str(ckpt), task=task, mode="lora", lora=LoraConfig(rank=2, alpha=4.0)
    )
    setup = Setup(cfg, ("a", "b", "c"), 3)
    variables = nnx.state(TaskModel(**setup.model_kw, rngs=nnx.Rngs(1))).to_pure_dict()
    return setup, variables


@pytest.mark.parametrize(
    "task, auto, pipe",
    [
        ("sequence_classification", "AutoModelForSequenceClassification", "text-classification"),
        ("residue_classification", "AutoModelForTokenClassification", None),
    ],
)
def test_finetune_hf_and_peft_exports_carry_the_tokenizer(ckpt, tmp_path, task, auto, pipe):
    setup, variables = _task_setup(ckpt, task)
    export.write_hf_task(setup, variables, tmp_path / "hf")
    export.write_peft(setup, variables, tmp_path / "ad")
    ids = batch_encode(SEQS[:1])[0].tolist()
    for folder in ("hf", "ad"):
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / folder)
        assert tok(SEQS[0])["input_ids"] == ids, folder
    model = getattr(transformers, auto).from_pretrained(tmp_path / "hf")
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    if pipe:
        got = transformers.pipeline(pipe, model=str(tmp_path / "hf"), device="cpu")(SEQS[2])[0]
        ours = TaskModel(**setup.model_kw, rngs=nnx.Rngs(0))
        nnx.update(ours, nnx.State(export.plain_variables(setup, variables)))
        logits = np.asarray(ours(batch_encode(SEQS[2:3])))[0]
        assert got["label"] == "abc"[int(logits.argmax())]


def test_fair_esm_export_loads_with_the_documented_call(ckpt, tmp_path):
    esm = pytest.importorskip("esm")
    path = tmp_path / "esm2_tiny_mine.pt"
    assert cli(["export", str(ckpt), str(path), "--to", "fair-esm"]) == 0
    # fair-esm reads the config by attribute (an argparse.Namespace, as in the released files),
    # which torch >= 2.6 unpickles only when allowed: the plain call refuses it.
    with pytest.raises(Exception, match="Weights only load failed"):
        esm.pretrained.load_model_and_alphabet_local(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(path)
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(SEQS[:3])])
    assert np.array_equal(tokens.numpy(), batch_encode(SEQS[:3]))
    with torch.no_grad():
        theirs = model.eval()(tokens, return_contacts=True)
    ours = _ours(ckpt, tokens.numpy(), contacts=True)
    for i, s in enumerate(SEQS[:3]):  # padding positions hold no prediction
        n = len(s)
        np.testing.assert_allclose(
            theirs["logits"][i, : n + 2].numpy(), ours["logits"][i, : n + 2], atol=1e-4
        )
        # contacts match only with the co-located -contact-regression.pt loaded
        np.testing.assert_allclose(
            theirs["contacts"][i, :n, :n].numpy(), ours["contacts"][i, :n, :n], atol=1e-5
        )
