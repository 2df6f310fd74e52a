"""The core install (`pip install clipcap-deploy`, no extra) captions an export bundle without torch.

Fast: a process of this virtualenv with torch, transformers and open_clip made unimportable captions an
export bundle through the command line and never asks for them; a model bundle there says which extra
to install. Slow: a fresh virtualenv under build/ from the core install alone, with pip's own
configuration (the local package mirror), runs `clipcap --help` and `clipcap caption`; a second one
with the `serve-ray` extra (still no torch) starts `clipcap serve-ray` and captions an image through
it. Their dependencies are installed once per pyproject.toml (the folder names carry its hash); the
project itself is reinstalled on every run, so the code tested is the code here.
"""
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipcap_bench.cold_start import directory_mb
from clipcap_bench.torchserve import free_ports

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "shapes-00.png"
BLOCKED = ("torch", "torchvision", "transformers", "open_clip")
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
PYPROJECT_HASH = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]

# Runs `clipcap` (argv from the command line) in this process, then prints which blocked packages got
# imported and which could be; with --block, importing them fails as if they were not installed.
CHILD = f"""
import json, sys
BLOCKED = {BLOCKED!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
args = sys.argv[1:]
if args[0] == "--block":
    sys.meta_path.insert(0, Block())
    args = args[1:]
import importlib.util
from clipcap.cli import main
try:
    code = main(args)
except SystemExit as exit:
    code = exit.code
installable = []
for name in BLOCKED:
    try:
        installable += [name] if importlib.util.find_spec(name) is not None else []
    except ModuleNotFoundError:
        pass
imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"code": code, "imported": imported, "importable": installable}}), file=sys.stderr)
"""


def run_clipcap(python: Path, *args: str, block: bool = False, cwd: Path | None = None) -> tuple[dict, str, str]:
    """(the child's report, stdout, stderr without the report) of `clipcap ARGS` run by `python`."""
    argv = [str(python), "-c", CHILD, *(["--block"] if block else []), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if cwd is None else {k: v for k, v in os.environ.items()
                                                                       if k != "PYTHONPATH"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd or ROOT, env=env)
    *lines, report = done.stderr.rstrip("\n").split("\n")
    return json.loads(report), done.stdout, "\n".join(lines)


def test_an_export_bundle_captions_with_torch_unimportable(tiny_export, tiny_bundle):
    report, out, err = run_clipcap(Path(sys.executable), "caption", str(tiny_export), str(SAMPLE), "--json", block=True)
    assert report["code"] == 0, err
    assert report["imported"] == [], f"imported without torch installed: {report['imported']}"
    caption = json.loads(out)[0]
    assert caption["token_ids"] and caption["image"] == str(SAMPLE)
    for decoding in (["--decoding", "beam"], ["--decoding", "nucleus", "--seed", "3"]):
        report, _, err = run_clipcap(Path(sys.executable), "caption", str(tiny_export), str(SAMPLE), *decoding,
                                     block=True)
        assert report["code"] == 0 and report["imported"] == [], err


def test_caption_dataset_runs_with_torch_unimportable(tiny_export, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE, images / SAMPLE.name)
    report, _, err = run_clipcap(Path(sys.executable), "caption-dataset", str(tiny_export), str(images),
                                 "--out", str(tmp_path / "out"), block=True)
    assert report["code"] == 0 and report["imported"] == [], err
    assert list((tmp_path / "out").glob("part-*.parquet"))


def test_a_model_bundle_without_torch_names_the_extra(tiny_bundle):
    report, _, err = run_clipcap(Path(sys.executable), "caption", str(tiny_bundle), str(SAMPLE), block=True)
    assert report["code"] != 0
    assert "pip install 'clipcap-deploy[torch]'" in err


def _venv(name: str, extras: str = "") -> Path:
    """build/NAME-HASH: a virtualenv with the core install's dependencies (and `extras`'), built once per
    pyproject.toml, and this checkout's clipcap installed into it now (no dependencies, not editable)."""
    path = ROOT / "build" / f"{name}-{PYTHON_TAG}-{PYPROJECT_HASH}"
    python = path / "bin" / "python"
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    if not (path / ".dependencies-installed").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", target], check=True, timeout=1800)
        (path / ".dependencies-installed").touch()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
                   check=True, timeout=600)
    return python


@pytest.mark.slow
def test_the_core_install_captions_an_export_bundle(tiny_export, tmp_path):
    python = _venv("core-venv")
    report, out, err = run_clipcap(python, "--help", cwd=tmp_path)
    assert report["code"] == 0 and "caption" in out, err
    report, out, err = run_clipcap(python, "caption", str(tiny_export), str(SAMPLE), "--json", cwd=tmp_path)
    assert report["code"] == 0, err
    assert report["importable"] == [] and report["imported"] == []
    _, expected, _ = run_clipcap(Path(sys.executable), "caption", str(tiny_export), str(SAMPLE), "--json")
    assert json.loads(out) == json.loads(expected)  # the same caption as the full install's
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE, images / SAMPLE.name)
    report, _, err = run_clipcap(python, "caption-dataset", str(tiny_export), str(images), "--out",
                                 str(tmp_path / "out"), cwd=tmp_path)
    assert report["code"] == 0 and report["imported"] == [], err
    assert directory_mb(python.parent.parent) <= 500, "the core install's target size"


@pytest.mark.slow
def test_the_ray_front_of_the_core_install_captions_an_image(tiny_export, tmp_path):
    python = _venv("core-ray-venv", "serve-ray")
    report, _, _ = run_clipcap(python, "--help", cwd=tmp_path)
    assert report["importable"] == []
    port, = free_ports(1)
    server = subprocess.Popen([str(python.parent / "clipcap"), "serve-ray", str(tiny_export), "--no-auth",
                               "--model-config", str(ROOT / "serving" / "model-config.yaml"), "--port", str(port),
                               "--replicas", "1"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        output = []
        for line in server.stdout:
            output.append(line)
            if line.startswith("serving "):
                break
        assert server.poll() is None, "".join(output[-40:])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/predictions/clipcap", SAMPLE.read_bytes(), {"Content-Type": "image/png"})
        response = connection.getresponse()
        reply = json.loads(response.read())
        assert response.status == 200, reply
        _, expected, _ = run_clipcap(Path(sys.executable), "caption", str(tiny_export), str(SAMPLE), "--json")
        assert reply["token_ids"] == json.loads(expected)[0]["token_ids"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Ray's own processes, in the server's session, leave with it
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
