"""The `clipcap` command: thin argument parsing over `Captioner` and the bundle functions.

torch, transformers and open_clip are imported only where a model bundle or an import needs them, so
`--help` and argument errors answer at once, and captioning an export bundle runs on the core install
(numpy and onnxruntime, no torch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipcap.config import BundleError
from clipcap.decoding_options import STRATEGIES, USED_BY, DecodingError, DecodingOptions, check_used
from clipcap.image_formats import DEFAULT_FORMATS, ImageError, check_formats
from clipcap.runtimes import RUNTIMES, RuntimeUnavailable

USER_ERRORS = (BundleError, ImageError, DecodingError, RuntimeUnavailable)
INTERRUPTED = 130  # exit code after Ctrl-C, as a shell reports a process SIGINT stopped


def _add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    defaults = DecodingOptions()
    parser.add_argument("bundle", help="model bundle or export bundle directory")
    parser.add_argument("--decoding", choices=STRATEGIES, default=defaults.strategy)
    # Strategy-specific flags default to None: one given with a strategy that ignores it is refused (_options).
    parser.add_argument("--beam-size", type=int, default=None, help=f"beam only (default: {defaults.beam_size})")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the bundle's max_tokens")
    parser.add_argument("--top-p", type=float, default=None, help=f"nucleus only (default: {defaults.top_p})")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"beam and nucleus only (default: {defaults.temperature})")
    parser.add_argument("--seed", type=int, default=None, help="nucleus only (default: a random seed)")
    parser.add_argument("--no-cache", action="store_true", help="the paper's decoding: recompute every step")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", choices=sorted(RUNTIMES), default=None,
                        help="default: the one the bundle's kind needs (model: torch, export: onnxruntime, ...)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text lines")


def _add_formats_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", type=_formats, default=DEFAULT_FORMATS, metavar="JPEG,PNG,...",
                        help=f"image formats accepted (default: {','.join(DEFAULT_FORMATS)})")


def _formats(text: str) -> tuple[str, ...]:
    try:
        return check_formats(name.strip() for name in text.split(",") if name.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _options(args: argparse.Namespace) -> DecodingOptions:
    """The flags as DecodingOptions; a flag the chosen --decoding would ignore is refused (DecodingError)."""
    given = {name: getattr(args, name) for name in USED_BY if getattr(args, name) is not None}
    check_used(args.decoding, given, "--decoding", lambda name: "--" + name.replace("_", "-"))
    return DecodingOptions(strategy=args.decoding, max_tokens=args.max_tokens, use_cache=not args.no_cache, **given)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def _seeds(options: DecodingOptions, indices) -> list[int] | None:
    """Item i of the whole command line samples with seed + i, however the items are split into batches."""
    return None if options.seed is None else [options.seed + i for i in indices]


def _print_results(results: list[dict], key: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))  # captions in any language, as written
        return
    for result in results:
        print(f"{result[key]}\t{result['caption']}")


def _open(args: argparse.Namespace):
    if args.batch_size < 1:
        raise DecodingError(f"--batch-size must be >= 1, got {args.batch_size}")
    from clipcap.captioner import Captioner

    return Captioner.from_path(args.bundle, backend=args.backend, device=args.device)


def _image_files(paths: list[str], formats: tuple[str, ...]) -> list[str]:
    """The command line's images: a file as given, a folder as its files of the accepted formats (sorted,
    recursive, by extension as `caption-dataset` walks one); the files a walk leaves out are reported."""
    from clipcap.bulk.sources import list_images

    files = []
    for path in paths:
        if not Path(path).is_dir():
            files.append(path)
            continue
        listing = list_images(path, formats)
        files.extend(ref.path for ref in listing.refs)
        if listing.skipped:
            kinds = ", ".join(f"{count} {ending}" for ending, count in listing.skipped.items())
            print(f"{path}: {sum(listing.skipped.values())} files skipped, not of the accepted --formats ({kinds})",
                  file=sys.stderr)
    return files


def cmd_caption(args: argparse.Namespace) -> int:
    """Decodes one batch of images at a time (memory bounded by --batch-size, not by the number of images)."""
    import numpy as np
    options = _options(args)
    captioner = _open(args)
    options = options.validate(captioner.token_limit)
    results, failed = [], 0
    # Positions on the command line: a file that fails does not shift the others' seeds.
    for start, names in _chunks(_image_files(args.images, args.formats), args.batch_size):
        pixels, kept, positions = [], [], []
        for position, name in enumerate(names, start):
            try:
                pixels.append(captioner.load_pixels_file(name, args.formats))
                kept.append(name)
                positions.append(position)
            except ImageError as error:  # report, skip, and caption the others
                print(f"error: {error}", file=sys.stderr)
                failed += 1
        if not pixels:
            continue
        batch = captioner.caption_pixels(np.stack(pixels), options, _seeds(options, positions))
        rows = [{"image": name, "caption": caption.caption, "token_ids": caption.token_ids}
                for name, caption in zip(kept, batch.captions)]
        if args.json:
            results.extend(rows)
        else:
            _print_results(rows, "image", as_json=False)
    if args.json:
        _print_results(results, "image", as_json=True)
    return 2 if failed else 0


def cmd_caption_embeddings(args: argparse.Namespace) -> int:
    import numpy as np

    options = _options(args)
    captioner = _open(args)
    options = options.validate(captioner.token_limit)
    path = Path(args.embeddings)
    if not path.is_file():
        raise BundleError(f"{path}: file not found")
    try:
        embeddings = np.load(path, allow_pickle=False)  # never unpickle a data file
    except (ValueError, OSError) as error:
        raise BundleError(f"{path}: not a readable .npy array ({error})") from None
    if embeddings.ndim == 0:
        raise BundleError(f"{path}: holds a scalar, expected an array of shape (N, D)")
    results = []
    for start in range(0, len(embeddings), args.batch_size):
        rows = embeddings[start:start + args.batch_size]
        batch = captioner.caption_embeddings(rows, options, _seeds(options, range(start, start + len(rows))))
        for index, caption in enumerate(batch.captions, start):
            results.append({"index": index, "caption": caption.caption, "token_ids": caption.token_ids})
    _print_results(results, "index", args.json)
    return 0


def cmd_caption_dataset(args: argparse.Namespace) -> int:
    from clipcap.bulk.run import BulkConfig, Interrupted, caption_dataset
    from clipcap.bulk.shards import OutputError
    from clipcap.bulk.sources import SourceError

    config = BulkConfig(bundle=args.bundle, source=args.input, out=args.out, options=_options(args),
                        backend=args.backend, device=args.device, batch_size=args.batch_size,
                        shard_size=args.shard_size, embeddings=args.embeddings, formats=args.formats, engine=args.engine,
                        ray_address=args.ray_address, actors=args.actors, num_gpus=args.num_gpus)
    try:
        manifest = caption_dataset(config)
    except (SourceError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        counts = stop.manifest["counts"]
        print(f"interrupted: {counts['rows']} of {counts['images']} images kept in {args.out} "
              f"({counts['this_run']['captioned'] + counts['this_run']['failed']} this run); "
              f"the same command resumes", file=sys.stderr)
        return INTERRUPTED
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        counts, timings = manifest["counts"], manifest["timings"]
        print(f"{args.out}: {counts['rows']} of {counts['images']} images in {len(manifest['shards'])} shards, "
              f"{counts['failed']} failed; this run {counts['this_run']['captioned']} captioned, "
              f"{counts['this_run']['failed']} failed in {timings['seconds']} s ({timings['images_per_second']} images/s)"
              + _skipped_note(counts["skipped_files"]))
    return 0


def _skipped_note(skipped: dict[str, int]) -> str:
    if not skipped:
        return ""
    kinds = ", ".join(f"{count} {ending}" for ending, count in skipped.items())
    return f"; {sum(skipped.values())} files skipped, not of the accepted --formats ({kinds})"


def cmd_import_original(args: argparse.Namespace) -> int:
    from clipcap.formats.model_bundle import WEIGHTS_FILE, save_bundle
    from clipcap.formats.original import import_original

    random_clip = args.clip_pretrained.lower() == "none"
    bundle = import_original(args.checkpoint, clip_model=args.clip_model,
                             clip_pretrained=None if random_clip else args.clip_pretrained,
                             tokenizer=args.tokenizer, normalize_prefix=bool(args.normalize_prefix))
    config, mapper = bundle.config, bundle.config.mapper
    if mapper.type == "transformer" and args.normalize_prefix is None:
        # A warning, not an error: the checkpoint does not record it, and the paper's code trains either way.
        print("warning: transformer mapper imported without --normalize-prefix. The paper's transformer COCO "
              "checkpoint was trained with normalised prefixes and captions badly without; pass "
              "--normalize-prefix for it, or --no-normalize-prefix to confirm this checkpoint was not.",
              file=sys.stderr)
    out = save_bundle(bundle.model, bundle.tokenizer, args.out)
    if random_clip:
        size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6
        print(f"warning: --clip-pretrained none: the CLIP image tower in {out / WEIGHTS_FILE} ({size_mb:.0f} MB) "
              f"is RANDOM weights. Captions of images from this bundle mean nothing; it serves only "
              f"caption-embeddings with precomputed CLIP embeddings, or tests.", file=sys.stderr)
    heads = f", {mapper.num_heads} heads x {mapper.num_layers} layers" if mapper.type == "transformer" else ""
    clip = f"{config.clip.model_name} ({'random weights' if random_clip else config.clip.pretrained + ' weights'})"
    print(f"wrote {out}: {mapper.type} mapper{heads}, prefix_length {mapper.prefix_length}, "
          f"{'normalised' if config.normalize_prefix else 'unnormalised'} prefix, CLIP {clip}, "
          f"GPT-2 {config.gpt2.n_layer} layers x {config.gpt2.n_embd}")
    return 0


def cmd_serve_ray(args: argparse.Namespace) -> int:
    import os

    from clipcap.serving.config import ServingConfigError
    from clipcap.serving.ray_serve import RayServeConfig, RayServer

    config = RayServeConfig(bundle=args.bundle, model_config=args.model_config, host=args.host, port=args.port,
                            model_name=args.model_name, replicas=args.replicas, max_replicas=args.max_replicas,
                            min_replicas=args.min_replicas, gpus_per_replica=args.gpus_per_replica,
                            token=os.environ.get("CLIPCAP_SERVE_TOKEN"), token_file=args.token_file,
                            no_auth=args.no_auth, ray_address=args.ray_address,
                            metrics=args.metrics or args.metrics_port is not None, metrics_port=args.metrics_port)
    try:
        with RayServer(config) as server:
            where = "no token (--no-auth)" if server.token is None else (
                "the token from $CLIPCAP_SERVE_TOKEN" if config.token else f"the token in {config.token_file}")
            print(f"serving {args.bundle} at {server.url}/predictions/{config.model_name} and "
                  f"{server.url}/v2/models/{config.model_name}/infer; Authorization: Bearer <{where}>. Ctrl-C stops.",
                  flush=True)
            server.serve_forever()
    except ServingConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcap", description="ClipCap captioning: bundles, decoding, import.")
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption image files (or the images of a folder)")
    _add_decoding_flags(caption)
    _add_formats_flag(caption)
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="an image file, or a folder of them")
    caption.set_defaults(run=cmd_caption)

    embeddings = commands.add_parser("caption-embeddings", help="caption precomputed CLIP embeddings (.npy, [N, D])")
    _add_decoding_flags(embeddings)
    embeddings.add_argument("embeddings", metavar="EMBEDDINGS.npy")
    embeddings.set_defaults(run=cmd_caption_embeddings)

    dataset = commands.add_parser("caption-dataset", help="caption a collection into Parquet shards (resumable)")
    _add_decoding_flags(dataset)
    _add_formats_flag(dataset)
    dataset.add_argument("input", metavar="INPUT", help="folder of images, .txt/.csv/.parquet list, or WebDataset .tar(s)")
    dataset.add_argument("--out", required=True, help="output folder: part-NNNNN.parquet shards + manifest.json")
    dataset.add_argument("--shard-size", type=int, default=1000, help="rows per shard (the work a kill can lose)")
    dataset.add_argument("--embeddings", action="store_true", help="store each CLIP image embedding (any bundle, any backend)")
    dataset.add_argument("--engine", choices=("local", "ray"), default="local")
    dataset.add_argument("--ray-address", default=None, help="existing Ray cluster; default: an embedded local Ray")
    dataset.add_argument("--actors", type=int, default=2, help="captioner actors (--engine ray)")
    dataset.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (--engine ray)")
    dataset.set_defaults(run=cmd_caption_dataset)

    ray_serve = commands.add_parser("serve-ray", help="serve a bundle over HTTP on Ray Serve (TorchServe's API + KServe v2)")
    ray_serve.add_argument("bundle", help="model bundle or export bundle directory")
    ray_serve.add_argument("--model-config", default="serving/model-config.yaml",
                           help="batchSize, maxBatchDelay and the handler: section (the TorchServe archive's file)")
    ray_serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ray_serve.add_argument("--port", type=int, default=8000)
    ray_serve.add_argument("--model-name", default="clipcap", help="in /predictions/NAME and /v2/models/NAME")
    ray_serve.add_argument("--replicas", type=int, default=None, help="default: one per GPU of the cluster, else one")
    ray_serve.add_argument("--max-replicas", type=int, default=None,
                           help="autoscale between --min-replicas and this by ongoing requests")
    ray_serve.add_argument("--min-replicas", type=int, default=1)
    ray_serve.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 where there are GPUs")
    ray_serve.add_argument("--token-file", default="serve-ray-token",
                           help="where the generated bearer token is written (mode 0600); a token in "
                                "$CLIPCAP_SERVE_TOKEN is used instead of generating one")
    ray_serve.add_argument("--no-auth", action="store_true", help="no bearer token (local demos only)")
    ray_serve.add_argument("--ray-address", default=None, help="existing Ray cluster; default: an embedded local Ray")
    ray_serve.add_argument("--metrics", action="store_true",
                           help="the embedded Ray exports Prometheus metrics (ray_clipcap*) on 127.0.0.1; default: off")
    ray_serve.add_argument("--metrics-port", type=int, default=None,
                           help="that endpoint's port (implies --metrics); default: Ray picks one")
    ray_serve.set_defaults(run=cmd_serve_ray)

    original = commands.add_parser("import-original", help="bundle a checkpoint of the paper's code")
    original.add_argument("checkpoint", metavar="CKPT.pt")
    original.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name or JSON config")
    original.add_argument("--clip-pretrained", default="openai",
                          help="open_clip weights tag (local Hugging Face cache first, then the hub), a local "
                               "open_clip weights file, or 'none' (random CLIP weights)")
    original.add_argument("--tokenizer", default="gpt2",
                          help="hub name (local cache first), a tokenizer.json file, or a folder holding it")
    original.add_argument("--normalize-prefix", action=argparse.BooleanOptionalAction, default=None,
                          help="L2-normalise CLIP embeddings (the paper's transformer COCO checkpoint needs it)")
    original.add_argument("--out", required=True)
    original.set_defaults(run=cmd_import_original)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit code for SIGINT
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
