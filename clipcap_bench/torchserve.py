"""A private TorchServe for benchmarks: archives packed once per input, the server started the documented way,
on free loopback ports, in its own directory.

serving/config.properties is copied with its addresses, model store and metrics file moved, so the
server cannot collide with another one on this machine (8080-8082 may be taken); token
authorization stays on and the keys are read from the key file it writes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from clipcap_bench.load import read_api_keys
from clipcap_bench.steps import run_steps


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def packed_archive(bundle: Path, repo: Path, out: Path, backend: str | None = None) -> bool:
    """`bundle` packed into `out` (NAME.mar) with the shipped handler and model-config.yaml (`backend`: the
    runtime the handler opens it with; None, the bundle's own), unless the .mar already holds exactly these
    files (a digest stamp next to it); returns whether it was built."""
    from clipcap_bench.bundles import source_digest
    from clipcap.export.mar import ArchiveConfig, build_archive

    handler, model_config = repo / "serving" / "handler.py", repo / "serving" / "model-config.yaml"
    key = source_digest([Path(bundle), handler, model_config]) + f" backend={backend}"
    stamp = out.with_suffix(".sha256")
    if out.is_file() and stamp.is_file() and stamp.read_text() == key:
        return False
    stamp.unlink(missing_ok=True)
    build_archive(ArchiveConfig(bundle=Path(bundle), handler=handler, model_config=model_config, out=out,
                                backend=backend))
    stamp.write_text(key)
    return True


def pack_archives(store: Path, bundles: dict[str, tuple[Path, str | None]], repo: Path,
                  progress: bool = True) -> None:
    """store/NAME.mar for every NAME -> (bundle, backend), each packed only when its inputs changed."""
    run_steps([(f"{name}.mar", lambda name=name, bundle=bundle, backend=backend:
                packed_archive(bundle, repo, store / f"{name}.mar", backend))
               for name, (bundle, backend) in bundles.items()], "pack .mar", progress)


class LocalTorchServe:
    """`with LocalTorchServe(...) as server:` starts TorchServe with `models` ({name: .mar file in model_store})
    and waits until every model has a READY worker; leaving the block stops it and waits for its processes."""

    def __init__(self, root: Path, model_store: Path, models: list[str], repo: Path, threads: int = 1,
                 start_timeout_s: float = 240.0, python: Path | None = None, progress: bool = True):
        self.root, self.models, self.start_timeout_s = Path(root), models, start_timeout_s
        self.python, self.progress = str(python or sys.executable), progress  # the environment TorchServe runs in
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        self.url, self.management_url = f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}"
        overrides = {"inference_address": self.url, "management_address": self.management_url,
                     "metrics_address": f"http://127.0.0.1:{metrics}", "grpc_inference_port": str(grpc_inference),
                     "grpc_management_port": str(grpc_management), "model_store": str(Path(model_store).resolve()),
                     "metrics_config": str(repo / "serving" / "metrics.yaml")}
        shipped = (repo / "serving" / "config.properties").read_text().splitlines()
        vmargs = next(line.split("=", 1)[1] for line in shipped if line.startswith("vmargs="))
        overrides["vmargs"] = vmargs.replace("=serving/", f"={repo.resolve() / 'serving'}/")  # the log4j2 file
        lines = [line for line in shipped if line.split("=", 1)[0] not in overrides]
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.properties").write_text("\n".join(lines + [f"{k}={v}" for k, v in overrides.items()]) + "\n")
        (self.root / "tmp").mkdir(exist_ok=True)
        (self.root / "key_file.json").unlink(missing_ok=True)
        # TMPDIR holds TorchServe's pid file, TEMP the workers' sockets: both private to this server.
        self.env = {**os.environ, "TMPDIR": str(self.root / "tmp"), "TEMP": str(self.root / "tmp"),
                    "OMP_NUM_THREADS": str(threads)}
        self.processes: list = []

    def _torchserve(self, *args: str) -> None:
        subprocess.run([self.python, "-m", "ts.model_server", *args], cwd=self.root, env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def keys(self) -> dict[str, str]:
        return read_api_keys(self.root / "key_file.json")

    def _ready(self, model: str) -> bool:
        if not (self.root / "key_file.json").exists():
            return False
        try:  # the key file may be half written, the port not open yet, the worker not started
            request = urllib.request.Request(f"{self.management_url}/models/{model}",
                                             headers={"Authorization": f"Bearer {self.keys()['management']}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return any(w["status"] == "READY" for w in json.loads(response.read())[0]["workers"])
        except (OSError, ValueError):
            return False

    def __enter__(self) -> "LocalTorchServe":
        import psutil
        from tqdm import tqdm

        self._torchserve("--start", "--ncs", "--ts-config", "config.properties",
                         "--models", *(f"{m}={m}.mar" for m in self.models))
        java = psutil.Process(int((self.root / "tmp" / ".model_server.pid").read_text()))
        self.processes = [java]
        try:
            deadline, ready = time.monotonic() + self.start_timeout_s, set()
            with tqdm(total=len(self.models), desc="TorchServe start", unit="model", disable=not self.progress) as bar:
                while True:
                    for model in set(self.models) - ready:
                        if self._ready(model):
                            ready.add(model)
                            bar.update()
                    if len(ready) == len(self.models):
                        break
                    if not java.is_running() or time.monotonic() > deadline:
                        raise RuntimeError(f"TorchServe did not get {', '.join(self.models)} ready within "
                                           f"{self.start_timeout_s:.0f} s; see {self.root / 'logs'}")
                    time.sleep(1)
            self.processes += java.children(recursive=True)  # the Python workers
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        if not self.processes:
            return
        self._torchserve("--stop")
        _, alive = psutil.wait_procs(self.processes, timeout=60)
        for process in alive:  # only this server's own processes
            process.kill()
        self.processes = []
