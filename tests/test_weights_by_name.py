"""Released weights by name (``esmjax convert esm2_t6_8M_UR50D``, ``facebook/...`` hub ids,
``--checkpoint NAME``) against a local HTTP server with fair-esm's URL layout and the HF hub's
API routes, serving tiny random-weight files: download, cache, resume, and one-line errors."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support.reference import fair_esm_model, hf_model
from test_convert import save_fair_esm_pt

from esmjax.cli import main as cli
from esmjax.io import checkpoint

NAME = "esm2_t6_8M_UR50D"  # a fair-esm name; the file served under it is a tiny random model
SHAPE = (2, 32, 4)
REPO = "facebook/esm2_t2_tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"


class Handler(BaseHTTPRequestHandler):
    """fair-esm's ``/fair-esm/{models,regression}/<file>`` and the hub's ``/api/models/<repo>/
    revision|tree/<rev>`` and ``/<repo>/resolve/<rev>/<file>``; byte ranges; a cut-off body once
    for a path in ``server.cut``."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        srv = self.server
        path = self.path.split("?")[0]
        srv.requests.append((self.command, path, self.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+).*", path):
            files = srv.repos.get(m[1])
            if files is None:
                error = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
                return self._send(404, b'{"error": "Repository not found"}', body, error)
            if m[2] == "revision":
                info = {"id": m[1], "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
            else:
                info = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
            return self._send(200, json.dumps(info).encode(), body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            data = srv.repos.get(m[1], {}).get(m[2])
            headers = {"X-Repo-Commit": SHA}
        else:
            data, headers = srv.files.get(path), {}
        if data is None:
            return self._send(404, b"not found", body)
        headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        given = self.headers.get("Range") if srv.ranges else None
        start = int(re.fullmatch(r"bytes=(\d+)-", given or "bytes=0-")[1])
        if start >= len(data) > 0:
            headers["Content-Range"] = f"bytes */{len(data)}"
            return self._send(416, b"", body, headers)
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(206 if start else 200, data[start:], body, headers, cut=srv.cut.pop(path, None))

    def _send(self, code, data, body, headers=None, cut=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            if self.server.pause:  # a slow download: half, a pause, the rest
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                time.sleep(self.server.pause)
                data = data[len(data) // 2 :]
            self.wfile.write(data[:cut])
        if cut is not None:
            self.close_connection = True  # the client sees fewer bytes than Content-Length


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server (``.url``, ``.files``, ``.repos``, ``.requests``, ``.cut``) and the tiny fair-esm
    model's ``.pt`` bytes."""
    d = tmp_path_factory.mktemp("served")
    save_fair_esm_pt(fair_esm_model(*SHAPE, seed=3), d / f"{NAME}.pt", *SHAPE)
    hf_model(2, 32, 4, seed=4).save_pretrained(d / "hf")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files = {
        f"/fair-esm/models/{NAME}.pt": (d / f"{NAME}.pt").read_bytes(),
        f"/fair-esm/regression/{NAME}-contact-regression.pt": (
            d / f"{NAME}-contact-regression.pt"
        ).read_bytes(),
    }
    hf_files = {p.name: p.read_bytes() for p in (d / "hf").iterdir()}
    srv.repos = {REPO: {**hf_files, "README.md": b"# tiny\n"}}
    srv.requests, srv.cut, srv.ranges, srv.pause = [], {}, True, 0.0
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def homes(tmp_path, monkeypatch, served):
    """Fresh torch hub and esmjax caches, fair-esm's URL on the local server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ESMJAX_HOME", str(tmp_path / "esmjax"))
    monkeypatch.setenv("ESMJAX_FAIR_ESM_URL", f"{served.url}/fair-esm")
    served.requests.clear()
    return tmp_path


def test_fair_esm_name_downloads_into_torch_hub_converts_and_embeds(homes, served, capsys):
    assert cli(["convert", NAME]) == 0
    folder = homes / "esmjax" / "models" / NAME
    assert capsys.readouterr().out.strip() == str(folder)
    hub_dir = homes / "torch" / "hub" / "checkpoints"
    assert (hub_dir / f"{NAME}.pt").read_bytes() == served.files[f"/fair-esm/models/{NAME}.pt"]
    assert (hub_dir / f"{NAME}-contact-regression.pt").exists()
    assert not list(hub_dir.glob("*.part"))
    cfg = checkpoint.open(folder).model_config
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads) == SHAPE
    # --checkpoint NAME: the cached conversion, no new download
    fasta = homes / "in.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    served.requests.clear()
    argv = ["embed", "--checkpoint", NAME, "--fasta", str(fasta), "--out", str(homes / "emb")]
    assert cli([*argv, "--no-progress"]) == 0
    assert (homes / "emb" / "a.npz").exists() and served.requests == []


def test_embed_by_name_converts_on_first_use_reusing_fair_esm_downloads(homes, served, capsys):
    hub_dir = homes / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    for path, data in served.files.items():  # as fair-esm's own torch.hub download left them
        (hub_dir / path.rpartition("/")[2]).write_bytes(data)
    fasta = homes / "in.fasta"
    fasta.write_text(">b\nMKV\n")
    argv = ["embed", "--checkpoint", NAME, "--fasta", str(fasta), "--out", str(homes / "emb")]
    assert cli([*argv, "--no-progress"]) == 0
    assert served.requests == [] and (homes / "esmjax" / "models" / NAME / "config.json").exists()
    assert (homes / "emb" / "b.npz").exists()


def test_partial_download_resumes_with_a_range_request(homes, served, capsys):
    path = f"/fair-esm/models/{NAME}.pt"
    whole = served.files[path]
    served.cut[path] = len(whole) // 3
    assert cli(["convert", NAME]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and served.url + path in err and "resume" in err, err
    part = homes / "torch" / "hub" / "checkpoints" / f"{NAME}.pt.part"
    assert part.stat().st_size == len(whole) // 3
    assert not part.with_name(f"{NAME}.pt").exists()  # never the partial under the real name
    assert cli(["convert", NAME]) == 0
    assert ("GET", path, f"bytes={len(whole) // 3}-") in served.requests
    assert part.with_name(f"{NAME}.pt").read_bytes() == whole and not part.exists()


def test_a_whole_part_is_kept_and_a_longer_one_started_over(homes, served, capsys):
    hub_dir = homes / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    model = served.files[f"/fair-esm/models/{NAME}.pt"]
    regression = served.files[f"/fair-esm/regression/{NAME}-contact-regression.pt"]
    (hub_dir / f"{NAME}.pt.part").write_bytes(model)  # stopped between the last byte and rename
    (hub_dir / f"{NAME}-contact-regression.pt.part").write_bytes(regression + b"more")
    assert cli(["convert", NAME]) == 0
    assert [m for m, p, _ in served.requests if p.endswith(f"{NAME}.pt")] == ["GET"]
    assert (hub_dir / f"{NAME}.pt").read_bytes() == model
    assert (hub_dir / f"{NAME}-contact-regression.pt").read_bytes() == regression


def test_a_server_without_ranges_restarts_the_part_and_404_is_one_line(
    homes, served, capsys, monkeypatch
):
    hub_dir = homes / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    (hub_dir / f"{NAME}.pt.part").write_bytes(b"stale bytes")
    monkeypatch.setattr(served, "ranges", False)  # answers 200 and the whole file to a Range
    assert cli(["convert", NAME]) == 0
    assert ("GET", f"/fair-esm/models/{NAME}.pt", "bytes=11-") in served.requests
    assert (hub_dir / f"{NAME}.pt").read_bytes() == served.files[f"/fair-esm/models/{NAME}.pt"]
    capsys.readouterr()
    monkeypatch.setenv("ESMJAX_FAIR_ESM_URL", f"{served.url}/nothing-here")
    monkeypatch.setenv("TORCH_HOME", str(homes / "torch2"))
    assert cli(["convert", NAME, str(homes / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 404" in err and "/nothing-here/models/" in err


def test_no_network_is_one_line_naming_the_url(homes, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ESMJAX_FAIR_ESM_URL", f"http://127.0.0.1:{port}/fair-esm")
    assert cli(["convert", NAME]) == 2
    err = capsys.readouterr().err.strip()
    url = f"http://127.0.0.1:{port}/fair-esm/models/{NAME}.pt"
    assert len(err.splitlines()) == 1 and url in err and "by hand" in err, err


def _esmjax(args, env):
    code = "import sys; from esmjax.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def hf_env(served, tmp_path):
    """A subprocess's environment (huggingface_hub reads HF_ENDPOINT once, at import): the local
    hub, fresh HF and esmjax caches."""
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": served.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "ESMJAX_HOME": str(tmp_path / "esmjax"),
    }


def test_hf_hub_id_through_huggingface_hub(served, tmp_path, hf_env):
    env = hf_env
    r = _esmjax(["convert", REPO], env)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "esmjax" / "models" / REPO.replace("/", "--")
    assert r.stdout.strip() == str(folder)
    cfg = checkpoint.open(folder).model_config
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads) == SHAPE
    fetched = {p for m, p, _ in served.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {f"/{REPO}/resolve/{SHA}/{f}" for f in ("config.json", "model.safetensors")}
    # offline: the HF cache serves it again; a repository not in the cache is one line
    offline = {**env, "HF_HUB_OFFLINE": "1", "ESMJAX_HOME": str(tmp_path / "again")}
    assert _esmjax(["convert", REPO], offline).returncode == 0
    r = _esmjax(["convert", "facebook/esmfold_v1"], offline)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"{served.url}/facebook/esmfold_v1" in err and "hf download" in err
    r = _esmjax(["convert", "facebook/esmfold_v1"], env)  # online: the hub's 404
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "RepositoryNotFoundError" in err and f"{served.url}/facebook/esmfold_v1" in err


# slow (15-20 s): the default suite downloads an HF id (test_hf_hub_id_through_huggingface_hub) and
# folds converted checkpoints (tests/test_esmfold_fold.py); this joins the two for ESMFold
@pytest.mark.slow
def test_fold_by_hf_hub_id(served, tmp_path, hf_env):
    from support.esmfold_reference import hf_model as esmfold_model

    esmfold_model("cli", 3, round_inv_freq=False).save_pretrained(tmp_path / "fold")
    served.repos["facebook/esmfold_tiny"] = {
        p.name: p.read_bytes() for p in tmp_path.glob("fold/*")
    }
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">p\nMKTVRQERLK\n")
    argv = ["fold", "--checkpoint", "facebook/esmfold_tiny", "--fasta", str(fasta), "--no-progress"]
    r = _esmjax([*argv, "--out", str(tmp_path / "out")], hf_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "p.pdb").exists()
    assert (tmp_path / "esmjax" / "models" / "facebook--esmfold_tiny" / "config.json").exists()


def test_esm_option_takes_a_fair_esm_name(homes, served):
    """``convert esmfold.pt --esm esm2_t6_8M_UR50D``: the ESM-2 from torch hub's cache by name."""
    from support.esmfold_reference import converted
    from test_esmfold_convert import _write_fairesm_pair

    cfg, model = converted("small")
    _write_fairesm_pair(homes, cfg, checkpoint.params_numpy(model))
    hub_dir = homes / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    (homes / "esm2_tiny.pt").rename(hub_dir / f"{NAME}.pt")
    (homes / "esm2_tiny-contact-regression.pt").rename(hub_dir / f"{NAME}-contact-regression.pt")
    assert cli(["convert", str(homes / "esmfold_tiny.pt"), str(homes / "out"), "--esm", NAME]) == 0
    assert served.requests == []
    assert checkpoint.load_esmfold(homes / "out")[0].cfg.esm == cfg.esm


def test_train_and_finetune_start_from_a_name(homes, served, tmp_path, shared_data):
    """``train --init-from NAME`` and ``finetune --backbone NAME``: the fair-esm files are
    downloaded once into torch hub's cache and read as they are (no conversion into the model
    cache); both runs keep the name in their config.json, and a resumed finetune matches it."""
    from support.data_fixtures import cath_head

    fa = tmp_path / "small.fa"
    cath_head(fa, 40)
    train_cfg = tmp_path / "t.json"
    train_cfg.write_text(
        json.dumps(
            {
                "data": {
                    "train": str(fa),
                    "seq_len": 64,
                    "tokens_per_step": 512,
                    "val_fraction": 0.2,
                },
                "optim": {"peak_lr": 1e-3, "warmup_steps": 1},
                "num_steps": 1,
                "eval_every": 0,
            }
        )
    )
    w = tmp_path / "w"
    argv = ["train", "--config", str(train_cfg), "--workdir", str(w), "--init-from", NAME]
    assert cli([*argv, "--no-progress"]) == 0
    saved = json.loads((w / "config.json").read_text())
    assert saved["init_from"] == NAME and saved["model"]["num_layers"] == SHAPE[0]
    got = sorted(p for m, p, _ in served.requests if m == "GET")
    assert got == sorted(served.files), got  # each file once
    assert not (homes / "esmjax" / "models").exists()  # read as it is, not converted

    seqs = [line for line in fa.read_text().splitlines() if not line.startswith(">")][:24]
    csv = tmp_path / "d.csv"
    rows = [
        f"{q[:40]},{i % 3 * 0.5},{'test' if i % 4 == 0 else 'train'}" for i, q in enumerate(seqs)
    ]
    csv.write_text("sequence,target,set\n" + "\n".join(rows) + "\n")
    ft_cfg = tmp_path / "f.json"
    ft_cfg.write_text(
        json.dumps(
            {"task": "sequence_regression", "mode": "frozen", "num_steps": 2, "eval_every": 2}
        )
    )
    served.requests.clear()
    fw = tmp_path / "fw"
    argv = ["finetune", "--config", str(ft_cfg), "--backbone", NAME, "--set", f"data.csv={csv}"]
    assert cli([*argv, "--set", "data.batch_size=8", "--workdir", str(fw), "--no-progress"]) == 0
    assert served.requests == []  # torch hub's cache
    assert json.loads((fw / "config.json").read_text())["finetune"]["backbone"] == NAME
    assert json.loads((fw / "report.json").read_text())["examples"]["test"] == 6


def test_concurrent_downloads_of_one_name_write_one_file(homes, served):
    """Two processes of a job on one host fetch the same name at once: one downloads, the other
    waits for it and finds the file (without the lock both would append to one .part)."""
    code = f"from esmjax.io import hub; print(hub.source('{NAME}'))"
    env = dict(os.environ)
    served.pause = 1.5  # the second process starts while the first still downloads
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    finally:
        served.pause = 0.0
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    pt = homes / "torch" / "hub" / "checkpoints" / f"{NAME}.pt"
    assert pt.read_bytes() == served.files[f"/fair-esm/models/{NAME}.pt"]
    fetched = [p for m, p, _ in served.requests if m == "GET"]
    assert sorted(fetched) == sorted(served.files), fetched  # each file once
