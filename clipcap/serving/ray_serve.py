"""`clipcap serve-ray`: the caption service on Ray Serve, the scale-out front next to TorchServe.

Each replica holds one `CaptionService` (the TorchServe handler's, with its `CaptionEngine`) and a
`CaptionFront` (clipcap.serving.front: TorchServe's inference API and the Open Inference Protocol);
each request is parsed on a thread and handed to the engine, which decodes every running request
together step by step; a request whose client disconnects is cancelled (Ray Serve cancels its task). Replicas are a fixed
count (default one per GPU, else one) or autoscaled by ongoing requests. The handler's metrics
(`ClipcapBatchSize`, ...) are Ray metrics: Ray's Prometheus endpoint exports them lower-cased with
a `ray_` prefix (`ray_clipcapbatchsize_bucket`), when metrics are on. Imported only for `serve-ray`
(Ray Serve is the `serve-ray` extra). Without an address an embedded Ray is started on this machine:
every socket of it on 127.0.0.1, no dashboard, no Prometheus endpoint unless `metrics`, no usage
stats, and clipcap.serving.http_limits in its HTTP proxy.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import clipcap
from clipcap.serving import http_limits
from clipcap.serving.service import BATCH_SIZE_BUCKETS, BatchStats, CaptionService, resolve_device, set_compute_threads
from clipcap.serving.config import ServingConfig, ServingConfigError
from clipcap.serving.front import CaptionFront, FrontConfig

logger = logging.getLogger(__name__)

APP_NAME = "clipcap"
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20  # request bodies over ~100 kB pass through it
# Prometheus' default buckets, as TorchServe's histograms use: the same le= bounds on both fronts (seconds).
HISTOGRAM_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
BATCH_SIZE_BOUNDARIES = [float(bound) for bound in BATCH_SIZE_BUCKETS]  # ClipcapBatchSize: 1, 2, 4, 8, ...


@dataclass
class RayServeConfig:
    bundle: str  # model or export bundle directory, readable by every node
    model_config: str = "serving/model-config.yaml"  # batchSize, maxBatchDelay and the handler: section
    host: str = "127.0.0.1"  # the HTTP proxy's address; loopback unless a proxy with TLS is in front
    port: int = 8000  # the HTTP proxy's port
    model_name: str = "clipcap"  # /predictions/<name>, /v2/models/<name>
    replicas: int | None = None  # fixed count; None: one per GPU of the cluster (one without GPUs)
    max_replicas: int | None = None  # set: autoscale between min_replicas and max_replicas
    min_replicas: int = 1  # autoscaling's floor
    target_ongoing_requests: float = 8.0  # autoscaling's target per replica: about one batch in flight
    cpus_per_replica: float = 1.0  # Ray CPUs each replica reserves
    gpus_per_replica: float | None = None  # None: 1 where the cluster has GPUs, else 0
    # Per replica; None: the engine's queue and rows (handler.max_queued + handler.batch_rows), so a replica holds
    # no more than its engine admits. Requests past it wait in Ray's router.
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 100  # waiting beyond every replica's batches: 503, as TorchServe's job_queue_size
    token: str | None = None  # the bearer token; None: generate one and write it to token_file (unless no_auth)
    token_file: str = "serve-ray-token"  # where a generated token is written, mode 0600
    no_auth: bool = False  # serve without a token (local demos only)
    max_request_bytes: int = 16 * 2**20  # the whole HTTP body, as TorchServe's max_request_size
    max_header_bytes: int = http_limits.MAX_HEADER_BYTES  # request line and headers (the embedded Ray's proxy)
    body_timeout_s: float = 30.0  # a request body must arrive within this, else 408 and the connection closed
    max_images_per_request: int = 16  # images in one v2 infer request
    ray_address: str | None = None  # an existing cluster; None: an embedded Ray on this machine
    metrics: bool = False  # the embedded Ray's metrics agent exports Prometheus metrics (on 127.0.0.1)
    metrics_port: int | None = None  # that endpoint's port, with metrics on; None: a port Ray picks


@dataclass
class BatchSettings:
    """What the replicas read from model-config.yaml: its handler: section (batchSize and maxBatchDelay are
    TorchServe's; the engine's own settings are in the handler section)."""

    handler: ServingConfig  # the handler: section, exactly as the TorchServe handler reads it

    @classmethod
    def from_file(cls, path: str | Path) -> "BatchSettings":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ServingConfigError(f"{path}: file not found (pass --model-config serving/model-config.yaml)")
        data = yaml.safe_load(path.read_text()) or {}
        return cls(ServingConfig.from_dict(data.get("handler")))


class CaptionReplica:
    """One Ray Serve replica: the bundle's CaptionService behind the HTTP front (made a deployment by `build_app`)."""

    def __init__(self, bundle: str, settings: BatchSettings, front: FrontConfig):
        import ray
        from ray import serve
        from ray.serve import metrics

        from clipcap.captioner import Captioner

        config = settings.handler
        http_limits.log_through_serve("clipcap")  # refusals and tracebacks into the replica's Serve log
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)  # cpus_per_replica
        set_compute_threads(config.threads or max(1, int(cpus)), f"handler.threads {config.threads}, {cpus} CPUs")
        gpu_id = 0 if ray.get_gpu_ids() else None  # Ray shows a replica only its own GPU
        captioner = Captioner.from_path(bundle, backend=config.backend, device=resolve_device(config.device, gpu_id))
        self.service = CaptionService(captioner, config)
        self.service.warm_up(config.encode_batch)  # before the replica reports ready
        replica = serve.get_replica_context().replica_id.unique_id
        self.front = CaptionFront(dataclasses.replace(front, headers={"x-clipcap-replica": replica}), self.service,
                                  lambda reply: self._record(BatchStats.of([reply])))
        self.metrics = {
            "ClipcapBatchSize": metrics.Histogram("ClipcapBatchSize", boundaries=BATCH_SIZE_BOUNDARIES,
                                                  description="the most rows a request shared a decode step with"),
            "ClipcapTokensGenerated": metrics.Counter("ClipcapTokensGenerated", description="tokens generated"),
            **{f"Clipcap{stage}Seconds": metrics.Histogram(f"Clipcap{stage}Seconds", boundaries=HISTOGRAM_BOUNDARIES,
                                                            description=f"{stage.lower()} time per batch")
               for stage in ("Preprocess", "Encode", "Decode")}}

    async def __call__(self, request):
        from starlette.responses import Response, StreamingResponse

        # A client that goes away cancels this task (Ray Serve), and with it the request's decode.
        answer = await self.front.answer(request.method, request.url.path, request.url.query,
                                         dict(request.headers.items()), request.stream())  # a repeated header: its last
        if isinstance(answer.body, bytes):
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
        return StreamingResponse(answer.body, status_code=answer.status, headers=answer.headers)

    def _record(self, stats: BatchStats) -> None:
        for rows in stats.rows:
            self.metrics["ClipcapBatchSize"].observe(rows)
        if stats.captioned:
            self.metrics["ClipcapTokensGenerated"].inc(stats.tokens)
            for stage, milliseconds in stats.timings_ms.items():
                self.metrics[f"Clipcap{stage.capitalize()}Seconds"].observe(milliseconds / 1e3)


def resolve_token(config: RayServeConfig) -> str | None:
    """The token to require: None with no_auth, the given one, else a new one written to token_file (0600;
    ServingConfigError when token_file is a symbolic link, which would have the token written elsewhere)."""
    if config.no_auth:
        return None
    if config.token:
        return config.token
    token = secrets.token_urlsafe(32)
    path = Path(config.token_file)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        if path.is_symlink():
            raise ServingConfigError(f"{path} is a symbolic link: the token is not written through it "
                                     f"(remove it, or pass another --token-file)") from None
        raise ServingConfigError(f"{path}: cannot write the token file ({error.strerror})") from None
    os.fchmod(descriptor, 0o600)  # an existing file keeps its mode on open: make it private before writing
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


def build_app(config: RayServeConfig, token: str | None, gpus_in_cluster: float = 0):
    """The Ray Serve application: one deployment of CaptionReplica, scaled as `config` says."""
    from ray import serve

    settings = BatchSettings.from_file(config.model_config)
    gpus = config.gpus_per_replica if config.gpus_per_replica is not None else (1.0 if gpus_in_cluster else 0.0)
    scaling = {"num_replicas": config.replicas or max(1, int(gpus_in_cluster // gpus) if gpus else 1)}
    if config.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                          "target_ongoing_requests": config.target_ongoing_requests}}
    deployment = serve.deployment(
        CaptionReplica, name="CaptionReplica", **scaling,
        max_ongoing_requests=config.max_ongoing_requests or settings.handler.max_queued + settings.handler.batch_rows,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": gpus})
    front = FrontConfig(model_name=config.model_name, token=token, max_request_bytes=config.max_request_bytes,
                        max_images_per_request=config.max_images_per_request, body_timeout_s=config.body_timeout_s)
    return deployment.bind(str(Path(config.bundle).resolve()), settings, front)


def application(args: dict):
    """Ray Serve's application builder, for a Serve config file or a KubeRay RayService
    (`import_path: clipcap.serving.ray_serve:application`): `args` are RayServeConfig fields (host and port
    are the Serve config's http_options instead). The token is $CLIPCAP_SERVE_TOKEN (a Kubernetes
    Secret) unless `no_auth: true`; nothing is written to a file."""
    import ray

    config = RayServeConfig(**args)
    token = None if config.no_auth else os.environ.get("CLIPCAP_SERVE_TOKEN")
    if not config.no_auth and not token:
        raise ServingConfigError("set CLIPCAP_SERVE_TOKEN (the bearer token clients send), or no_auth: true")
    return build_app(config, token, ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0)


# Set before an embedded Ray starts (its processes inherit them). Ray replaces a node address of 127.0.0.1
# with the host's own unless it runs as on a laptop (a single-machine "cluster"), and binds every server of
# a node with another address to all interfaces; the proxy callback puts clipcap.serving.http_limits in front.
EMBEDDED_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": http_limits.CALLBACK}


def _check_loopback(node_address: str) -> None:
    if node_address not in ("127.0.0.1", "::1"):
        raise ServingConfigError(
            f"the embedded Ray took node address {node_address}, so its servers would listen on every interface: "
            f"Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set (clipcap serve-ray sets it; "
            f"in Python, set it before importing ray)")


def worker_pythonpath() -> str:
    """PYTHONPATH that makes an embedded Ray's workers import this process's clipcap (a checkout or an install)."""
    root = str(Path(clipcap.__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


class RayServer:
    """`with RayServer(config) as server:` serves until the block ends (Ray Serve shut down, an embedded Ray stopped)."""

    def __init__(self, config: RayServeConfig):
        self.config = config
        self.token: str | None = None
        self.url = f"http://{config.host}:{config.port}"
        self._started_ray = False

    def __enter__(self) -> "RayServer":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        embedded = not self.config.ray_address
        if embedded:
            for name, value in EMBEDDED_RAY_ENV.items():
                os.environ.setdefault(name, value)
            os.environ.update({http_limits.HEADER_LIMIT_ENV: str(self.config.max_header_bytes),
                               http_limits.BODY_LIMIT_ENV: str(self.config.max_request_bytes)})
        import ray
        from ray import serve

        BatchSettings.from_file(self.config.model_config)  # a bad file fails here, before Ray starts
        self.token = resolve_token(self.config)  # so does a token file that cannot be written
        if not ray.is_initialized():
            self._started_ray = True
            if not embedded:
                ray.init(address=self.config.ray_address, logging_level=logging.WARNING)
            else:
                replicas = self.config.max_replicas or self.config.replicas or 1
                ray.init(num_cpus=max(os.cpu_count() or 1, int(replicas * self.config.cpus_per_replica) + 1),
                         object_store_memory=EMBEDDED_OBJECT_STORE_BYTES, include_dashboard=False,
                         _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                         _metrics_export_port=self.config.metrics_port if self.config.metrics else None,
                         _system_config={"enable_metrics_collection": self.config.metrics},
                         runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
        try:
            if embedded and self._started_ray:
                _check_loopback(ray.util.get_node_ip_address())
            serve.start(http_options={"host": self.config.host, "port": self.config.port})
            app = build_app(self.config, self.token, ray.cluster_resources().get("GPU", 0))
            serve.run(app, name=APP_NAME, route_prefix="/")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()

    def serve_forever(self) -> None:
        while True:
            time.sleep(3600)
