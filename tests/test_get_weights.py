"""scripts/get_weights.py against a local HTTP server on 127.0.0.1 (Range support, broken connections).

The served files are made here in the official key layouts with random values (the converters' test helpers);
nothing touches the real internet: every in-process connection goes through ``pop3d.downloads._urlopen``,
which a fixture restricts to loopback.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch
from _paths import ROOT
from _student_refs import micro_config
from safetensors.torch import save as save_safetensors_bytes
from test_student_checkpoint import _fake_fcos3d
from test_teacher_deeplab import _random_sd
from test_teacher_text import ORIGINAL_CLS2IDX, SMALL

from pop3d import downloads
from pop3d.checkpoint import load_student_weights
from pop3d.downloads import DownloadError, download
from pop3d.get_weights import catalogue, clip_sources, get_one
from pop3d.model import TPVFormer
from teacher.checkpoint import load_maskclip_plus, load_text_embeddings
from teacher.deeplab import DeepLabArch
from teacher.text import build_text_model
from teacher.weights_io import load_safetensors

MASKCLIP_FILE = "maskclip_plus_vit16_deeplabv2_r101-d8_512x512_8k_coco-stuff164k.pth"
HF_CLIP = "/timm/vit_base_patch16_clip_224.openai/resolve/main/"


# ------------------------------------------------------------------------------------------------
# a loopback file server with Range support that can break a transfer mid-file
# ------------------------------------------------------------------------------------------------

@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    breaks: dict[str, list[int]] = field(default_factory=dict)  # path -> cut points of the next GETs
    honour_range: bool = True
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        st: ServerState = self.server.state
        path, rng = urlsplit(self.path).path, self.headers.get("Range")
        st.requests.append((path, rng))
        body = st.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and st.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        cuts = st.breaks.get(path)
        if cuts:
            self.wfile.write(body[start:start + cuts.pop(0)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection breaks mid-file
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection the code opens must go to 127.0.0.1 (and not through a proxy)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = downloads._urlopen

    def guarded(req, timeout):
        assert urlsplit(req.full_url).hostname == "127.0.0.1", f"tried to reach {req.full_url}"
        return real(req, timeout)

    monkeypatch.setattr(downloads, "_urlopen", guarded)


# ------------------------------------------------------------------------------------------------
# the released files in their official layouts (random values)
# ------------------------------------------------------------------------------------------------

def _pth_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def official_files(cfg) -> dict[str, object]:
    """Published file name -> the object the official file holds (same structure and key names)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        student = {"module." + k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                   for k, v in TPVFormer(cfg).state_dict().items()}
    emb = torch.nn.functional.normalize(torch.randn(len(ORIGINAL_CLS2IDX), 512, generator=g), dim=1)
    teacher = _random_sd(DeepLabArch(depth=101, base_channels=2, stem_channels=4, aspp_channels=3))
    teacher["decode_head.text_embeddings"] = torch.randn(171, 512, generator=g)
    teacher["decode_head.proj.weight"] = torch.randn(512, 768, 1, 1, generator=g)
    torch.manual_seed(3)
    clip = build_text_model(None, model_cfg=SMALL).state_dict()
    return {
        "pop3d_weights.pth": {"state_dict": student, "epoch": 12, "global_iter": 1234},
        "zeroshot_weights.pth": (emb, list(ORIGINAL_CLS2IDX)),
        "r101_dcn_fcos3d_pretrain.pth": {"state_dict": _fake_fcos3d(cfg), "meta": {"epoch": 12}},
        MASKCLIP_FILE: {"state_dict": teacher, "meta": {"iter": 8000}},
        "open_clip_model.safetensors": clip,
    }


def serialise(name: str, obj) -> bytes:
    if name.endswith(".safetensors"):
        return save_safetensors_bytes({k: v.contiguous() for k, v in obj.items()})
    return _pth_bytes(obj)


@pytest.fixture(scope="module")
def cfg():
    return micro_config()


@pytest.fixture(scope="module")
def released(cfg):
    objs = official_files(cfg)
    return objs, {n: serialise(n, o) for n, o in objs.items()}


@pytest.fixture
def config_yaml(tmp_path, cfg):
    path = tmp_path / "micro.yaml"
    path.write_text(json.dumps({"model": json.loads(json.dumps(cfg.to_dict()))}))  # JSON is YAML
    return path


def load_script():
    spec = importlib.util.spec_from_file_location("get_weights_script", ROOT / "scripts" / "get_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = load_script().main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

def test_catalogue_holds_the_published_files(monkeypatch):
    cat = catalogue()
    assert set(cat) == {"pop3d", "zeroshot", "fcos3d", "clip", "maskclip_plus"}
    # the URLs the POP-3D README publishes (written out here, independently of the module)
    assert cat["pop3d"].sources[0].url == "https://data.ciirc.cvut.cz/public/projects/2023POP3D/pop3d_weights.pth"
    assert cat["zeroshot"].sources[0].url == \
        "https://data.ciirc.cvut.cz/public/projects/2023POP3D/zeroshot_weights.pth"
    assert cat["fcos3d"].sources[0].url == \
        "https://github.com/zhiqi-li/storage/releases/download/v1.0/r101_dcn_fcos3d_pretrain.pth"
    assert cat["maskclip_plus"].manual and "sharepoint.com" in cat["maskclip_plus"].page
    # CLIP comes from open_clip's own pretrained config for ('ViT-B-16', 'openai')
    from open_clip.pretrained import get_pretrained_cfg

    ocfg = get_pretrained_cfg("ViT-B-16", "openai")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    srcs = clip_sources()
    repo = ocfg["hf_hub"].rstrip("/")
    assert [s.url for s in srcs[:2]] == [f"http://127.0.0.1:9/{repo}/resolve/main/open_clip_model.safetensors",
                                         f"http://127.0.0.1:9/{repo}/resolve/main/open_clip_pytorch_model.bin"]
    assert srcs[-1].url == ocfg["url"] and srcs[-1].sha256 == ocfg["url"].split("/")[-2]
    assert all(s.sha256 is None for e in cat.values() for s in e.sources if e.name != "clip")


def test_all_from_a_mirror_converts_everything_then_skips(tmp_path, server, released, cfg, config_yaml, capsys):
    objs, blobs = released
    server.files = {f"/mirror/{n}": b for n, b in blobs.items()}
    out = tmp_path / "ckpts"
    rc, stdout, err = run_cli(capsys, "--all", "--out", out, "--base-url", f"{server.base}/mirror",
                              "--config", config_yaml, "--no-progress")
    assert rc == 0, err
    assert "5 of 5 file(s) ready" in stdout and "sha256 not published, not checked" in stdout
    # each converted file loads with the project's loaders and holds the served values
    model = TPVFormer(cfg)
    load_student_weights(model, out / "pop3d.safetensors", kind="pop3d")
    for k, v in model.state_dict().items():
        assert torch.equal(v, objs["pop3d_weights.pth"]["state_dict"]["module." + k]), k
    emb, cls2idx, _ = load_text_embeddings(out / "zeroshot_text.safetensors")
    assert torch.equal(emb, objs["zeroshot_weights.pth"][0]) and cls2idx.tolist() == ORIGINAL_CLS2IDX
    teacher = load_maskclip_plus(out / "maskclip_plus.safetensors")
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, objs[MASKCLIP_FILE]["state_dict"][k]), k
    clip, _ = load_safetensors(out / "clip_vit_b16.safetensors")
    assert clip.keys() == objs["open_clip_model.safetensors"].keys()
    assert torch.equal(clip["visual.conv1.weight"], objs["open_clip_model.safetensors"]["visual.conv1.weight"])
    fcos, meta = load_safetensors(out / "fcos3d.safetensors")
    assert meta["kind"] == "fcos3d" and any(k.startswith("img_backbone.") for k in fcos)
    # the record holds the sha256 of what the server sent
    rec = json.loads((out / "get_weights.json").read_text())
    for name, file in (("pop3d", "pop3d_weights.pth"), ("maskclip_plus", MASKCLIP_FILE)):
        assert rec[name]["sha256"] == hashlib.sha256(blobs[file]).hexdigest()
        assert rec[name]["source"] == f"{server.base}/mirror/{file}" and not rec[name]["sha256_published"]
    assert not list((out / "downloads").glob("*.part*"))
    # a second run downloads nothing and converts nothing
    n_requests = len(server.requests)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    rc, stdout, err = run_cli(capsys, "--all", "--out", out, "--base-url", f"{server.base}/mirror",
                              "--config", config_yaml, "--no-progress")
    assert rc == 0, err
    assert stdout.count("already converted, skipped") == 5 and len(server.requests) == n_requests
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}


def test_broken_download_resumes_with_a_range_request(tmp_path, server, released, capsys):
    blob = released[1]["zeroshot_weights.pth"]
    cut = len(blob) // 3
    server.files = {"/m/zeroshot_weights.pth": blob}
    server.breaks = {"/m/zeroshot_weights.pth": [cut]}
    out = tmp_path / "ckpts"
    args = ("zeroshot", "--out", out, "--base-url", f"{server.base}/m", "--no-progress", "--retries", "0")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"{server.base}/m/zeroshot_weights.pth" in err and "re-run the same command to resume" in err
    part = out / "downloads" / "zeroshot_weights.pth.part"
    assert part.stat().st_size == cut and not (out / "zeroshot_text.safetensors").exists()
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert server.requests[-1] == ("/m/zeroshot_weights.pth", f"bytes={cut}-")
    assert f"resumed at byte {cut:,}" in stdout
    assert (out / "downloads" / "zeroshot_weights.pth").read_bytes() == blob and not part.exists()
    emb, _, _ = load_text_embeddings(out / "zeroshot_text.safetensors")
    assert torch.equal(emb, released[0]["zeroshot_weights.pth"][0])


def test_retry_in_one_run_and_a_server_without_range_support(tmp_path, server):
    blob = os.urandom(300_000)
    server.files = {"/f.bin": blob}
    server.breaks = {"/f.bin": [100_000, 50_000]}
    got = download(f"{server.base}/f.bin", tmp_path / "f.bin", retries=2, backoff=0, progress=False)
    assert got.attempts == 3 and got.resumed_from == 150_000
    assert [r for _, r in server.requests] == [None, "bytes=100000-", "bytes=150000-"]
    assert (tmp_path / "f.bin").read_bytes() == blob and got.sha256 == hashlib.sha256(blob).hexdigest()
    # a server that ignores Range sends the whole file again: the .part restarts instead of growing wrong
    server.honour_range, server.requests[:] = False, []
    server.breaks = {"/f.bin": [120_000]}
    got = download(f"{server.base}/f.bin", tmp_path / "g.bin", retries=1, backoff=0, progress=False)
    assert got.resumed_from == 0 and (tmp_path / "g.bin").read_bytes() == blob


def test_size_and_sha256_are_checked_where_known(tmp_path, server):
    blob = os.urandom(50_000)
    server.files = {"/f.bin": blob}
    url = f"{server.base}/f.bin"
    with pytest.raises(DownloadError, match=r"sha256 .* differs .*removed it; re-run"):
        download(url, tmp_path / "a.bin", expected_sha256="0" * 64, progress=False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(DownloadError, match=r"50000 bytes, but the released file has 50001"):
        download(url, tmp_path / "a.bin", expected_size=50_001, progress=False)
    got = download(url, tmp_path / "a.bin", expected_size=50_000,
                   expected_sha256=hashlib.sha256(blob).hexdigest().upper(), progress=False)
    assert got.size == 50_000
    # a whole .part left from a run killed before its rename: the server's 416 completes it without a body
    (tmp_path / "b.bin.part").write_bytes(blob)
    (tmp_path / "b.bin.part.json").write_text(json.dumps({"url": url, "total": len(blob), "validator": '"v1"'}))
    got = download(url, tmp_path / "b.bin", progress=False)
    assert got.resumed_from == len(blob) and (tmp_path / "b.bin").read_bytes() == blob
    # a .part longer than the file now on the server (416, other total): started again within the attempt
    (tmp_path / "c.bin.part").write_bytes(os.urandom(60_000))
    (tmp_path / "c.bin.part.json").write_text(json.dumps({"url": url, "total": 60_000}))
    got = download(url, tmp_path / "c.bin", retries=0, progress=False)
    assert got.attempts == 1 and got.resumed_from == 0 and (tmp_path / "c.bin").read_bytes() == blob
    # a .part of another URL is not continued
    (tmp_path / "d.bin.part").write_bytes(blob[:1000])
    (tmp_path / "d.bin.part.json").write_text(json.dumps({"url": url + "?other", "total": len(blob)}))
    server.requests[:] = []
    got = download(url, tmp_path / "d.bin", progress=False)
    assert server.requests == [("/f.bin", None)] and (tmp_path / "d.bin").read_bytes() == blob


def test_a_file_that_does_not_fit_the_layout_is_refused(tmp_path, server, released, config_yaml, capsys):
    sd = dict(released[0]["pop3d_weights.pth"]["state_dict"])
    sd.pop("module.tpv_aggregator.classifier.bias")
    server.files = {"/m/pop3d_weights.pth": _pth_bytes({"state_dict": sd})}
    out = tmp_path / "ckpts"
    rc, _, err = run_cli(capsys, "pop3d", "--out", out, "--base-url", f"{server.base}/m", "--config", config_yaml,
                         "--no-progress")
    assert rc == 2 and err.count("\n") == 1
    assert "1 missing: tpv_aggregator.classifier.bias" in err and str(out / "downloads" / "pop3d_weights.pth") in err
    assert "delete it to download again" in err and not (out / "pop3d.safetensors").exists()
    # the paper config (no --config) refuses the micro file too, naming a shape
    server.files = {"/m/pop3d_weights.pth": released[1]["pop3d_weights.pth"]}
    rc, _, err = run_cli(capsys, "pop3d", "--out", tmp_path / "c2", "--base-url", f"{server.base}/m",
                         "--no-progress")
    assert rc == 2 and "shape mismatches" in err


def test_maskclip_plus_manual_page_then_local_file(tmp_path, server, released, capsys):
    out = tmp_path / "ckpts"
    rc, _, err = run_cli(capsys, "maskclip_plus", "--out", out)
    assert rc == 2 and err.count("\n") == 1 and not server.requests
    assert "sharepoint.com" in err and "--from FILE" in err and MASKCLIP_FILE in err
    # a file the user downloaded by hand, given with --from
    src = tmp_path / "Downloads" / MASKCLIP_FILE
    src.parent.mkdir()
    src.write_bytes(released[1][MASKCLIP_FILE])
    rc, stdout, err = run_cli(capsys, "maskclip_plus", "--out", out, "--from", src)
    assert rc == 0, err
    assert f"{src} (" in stdout and (out / "maskclip_plus.safetensors").exists()
    # or found in --out
    out2 = tmp_path / "other"
    out2.mkdir()
    (out2 / MASKCLIP_FILE).write_bytes(released[1][MASKCLIP_FILE])
    rc, stdout, err = run_cli(capsys, "maskclip_plus", "--out", out2)
    assert rc == 0 and (out2 / "maskclip_plus.safetensors").exists()


def test_all_without_the_manual_file_says_so_and_succeeds(tmp_path, server, released, config_yaml, capsys):
    names = ["pop3d_weights.pth", "zeroshot_weights.pth", "r101_dcn_fcos3d_pretrain.pth",
             "open_clip_model.safetensors"]
    server.files = {f"/m/{n}": released[1][n] for n in names}
    rc, stdout, err = run_cli(capsys, "--all", "--out", tmp_path / "c", "--base-url", f"{server.base}/m",
                              "--config", config_yaml, "--no-progress")
    assert rc == 0, err
    assert "note: maskclip_plus: NOT fetched" in stdout and "sharepoint.com" in stdout
    assert "4 of 5 file(s) ready" in stdout and "waiting for a manual download: maskclip_plus" in stdout


def test_clip_through_open_clip_config_with_fallback_to_the_pickled_file(tmp_path, server, released, monkeypatch):
    """HF_ENDPOINT points open_clip's hub entry at the local server, which lacks the safetensors file."""
    clip = released[0]["open_clip_model.safetensors"]
    server.files = {HF_CLIP + "open_clip_pytorch_model.bin": _pth_bytes(clip)}
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    out = tmp_path / "ckpts"
    res = get_one(catalogue()["clip"], out, None, progress=False)
    assert res.status == "converted" and res.origin.endswith("open_clip_pytorch_model.bin")
    assert [p for p, _ in server.requests] == [HF_CLIP + "open_clip_model.safetensors",
                                               HF_CLIP + "open_clip_pytorch_model.bin"]
    sd, meta = load_safetensors(out / "clip_vit_b16.safetensors")
    assert meta["format"] == "pop3d.teacher.open_clip/1" and torch.equal(sd["visual.proj"], clip["visual.proj"])


def test_command_line_errors_are_one_line_exit_2(tmp_path, server, released, capsys):
    cases = [
        (["nope"], "unknown name(s) ['nope']"),
        ([], "give one or more NAMEs or --all"),
        (["pop3d", "zeroshot", "--from", tmp_path / "x.pth"], "--from FILE goes with exactly one NAME"),
        (["pop3d", "--from", tmp_path / "x.pth"], f"{tmp_path / 'x.pth'}: no such file (--from)"),
        (["pop3d", "--url", "pop3d"], "expected NAME=URL"),
        (["pop3d", "--config", tmp_path / "none.yaml"], "no such config file"),
        (["zeroshot", "--base-url", f"{server.base}/empty"], "HTTP 404"),
    ]
    for argv, msg in cases:
        rc, _, err = run_cli(capsys, *argv, "--out", tmp_path / "o", "--no-progress")
        assert rc == 2 and err.count("\n") == 1 and msg in err, (argv, err)
    # nothing listens on the port: the URL is named, the advice is to re-run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run_cli(capsys, "zeroshot", "--url", f"zeroshot=http://127.0.0.1:{port}/z.pth", "--retries", "0",
                         "--out", tmp_path / "o", "--no-progress")
    assert rc == 2 and f"http://127.0.0.1:{port}/z.pth" in err and "cannot reach" in err
    # a file in --out that this command did not write is never replaced without --force
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "zeroshot_text.safetensors").write_bytes(b"mine")
    server.files = {"/z.pth": released[1]["zeroshot_weights.pth"]}
    rc, _, err = run_cli(capsys, "zeroshot", "--url", f"zeroshot={server.base}/z.pth", "--out", tmp_path / "o")
    assert rc == 2 and "--force" in err and (tmp_path / "o" / "zeroshot_text.safetensors").read_bytes() == b"mine"
    rc, _, err = run_cli(capsys, "zeroshot", "--url", f"zeroshot={server.base}/z.pth", "--out", tmp_path / "o",
                         "--force", "--no-progress")
    assert rc == 0, err
    assert load_text_embeddings(tmp_path / "o" / "zeroshot_text.safetensors")[0].shape == (102, 512)


def test_the_script_runs_as_a_command(tmp_path, server, released):
    server.files = {"/m/zeroshot_weights.pth": released[1]["zeroshot_weights.pth"]}
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_weights.py"), "zeroshot", "--out",
                           str(tmp_path / "ckpts"), "--base-url", f"{server.base}/m"],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 file(s) ready" in proc.stdout and (tmp_path / "ckpts" / "zeroshot_text.safetensors").exists()
