#!/usr/bin/env bash
# `make demo` (after scripts/setup.sh): the embedded demo model behind TorchServe, captioning samples/.
#   1. pack build/model_store/clipcap.mar from models/shapes-demo            (serving/build_mar.py)
#   2. start TorchServe on 127.0.0.1:8080-8082 (gRPC 7070-7071), token on    (serving/config.properties)
#   3. wait for the model's worker, caption every samples/*.png over HTTP, print the captions
#   4. print how to call the API yourself, then stop TorchServe and wait until its processes are gone
# KEEP_SERVER=1 leaves TorchServe running instead (stop it with: TMPDIR=build/demo-tmp .venv/bin/torchserve --stop).
# TorchServe keeps its pid file in $TMPDIR: the demo's is build/demo-tmp, so `torchserve --stop` for another
# server on this machine cannot stop the demo's, and the demo's stop cannot stop another.
# CLIPCAP_NO_TOKEN=1 starts it without token authorization: for a local demo only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BUNDLE=${BUNDLE:-models/shapes-demo}
SAMPLES=${SAMPLES:-samples}  # *.png, and captions.json with reference captions when present
PY=$VENV/bin/python
TORCHSERVE=$VENV/bin/torchserve
START_TIMEOUT=${START_TIMEOUT:-180}  # seconds for Java to start and the worker to load the model

die() { echo "demo: error: $*" >&2; exit 1; }

command -v java >/dev/null 2>&1 \
  || die "TorchServe needs Java 11+ and none is installed: run 'make setup' (installs OpenJDK 17) or install a JDK"
[ -x "$TORCHSERVE" ] || die "$TORCHSERVE not found: run 'make setup'"
[ -f "$BUNDLE/clipcap.json" ] \
  || die "demo bundle $BUNDLE not found: it ships with the repository; rebuild it with 'make demo-model'"
compgen -G "$SAMPLES/*.png" >/dev/null \
  || die "no $SAMPLES/*.png: recreate them with '$PY training/shapes.py --out samples --n 8 --seed 77 --samples'"
for port in 8080 8081 8082 7070 7071; do  # every port serving/config.properties sets
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use (a TorchServe running? the demo's own stops with 'TMPDIR=build/demo-tmp $TORCHSERVE --stop')"
  fi
done

"$PY" serving/build_mar.py --bundle "$BUNDLE" --out build/model_store/clipcap.mar

token_flag=()
if [ "${CLIPCAP_NO_TOKEN:-0}" = 1 ]; then
  token_flag=(--disable-token-auth)
  echo "demo: token authorization OFF (CLIPCAP_NO_TOKEN=1): anyone on this machine can call the API"
fi
rm -f key_file.json  # TorchServe writes fresh keys here at every start
# TMPDIR: TorchServe's pid file; TEMP: Java's temp dir and the workers' sockets. Both private to the demo.
export TMPDIR="$PWD/build/demo-tmp" TEMP="$PWD/build/demo-tmp"
mkdir -p "$TMPDIR"
pid_file="$TMPDIR/.model_server.pid"
"$TORCHSERVE" --start --ncs --ts-config serving/config.properties --models clipcap=clipcap.mar \
  "${token_flag[@]}" > build/torchserve.out 2>&1
sleep 1
java_pid=$(cat "$pid_file")

stop_server() {  # torchserve --stop returns at once; wait until Java and its workers have exited
  local pids
  pids="$java_pid $(ps -o pid= --ppid "$java_pid" 2>/dev/null | tr '\n' ' ')"
  "$TORCHSERVE" --stop >/dev/null 2>&1 || true
  for _ in $(seq 60); do
    local alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && { echo "demo: TorchServe stopped, no process left"; return 0; }
    sleep 1
  done
  echo "demo: TorchServe processes still alive after 60 s: $pids" >&2
  return 1
}
on_exit() {
  local status=$?
  if [ "$status" != 0 ] || [ "${KEEP_SERVER:-0}" != 1 ]; then stop_server; fi
  exit "$status"
}
trap on_exit EXIT

# Wait for the worker, caption the samples through the HTTP API (stdlib only: curl may be missing).
"$PY" - "$START_TIMEOUT" "$java_pid" "$SAMPLES" <<'PYTHON'
import json, os, sys, time, urllib.error, urllib.request
from pathlib import Path

timeout, java_pid, samples = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])

def call(url, key_kind=None, data=None, content_type=None):
    request = urllib.request.Request(url, data=data)
    if key_kind and Path("key_file.json").exists():
        request.add_header("Authorization", "Bearer " + json.loads(Path("key_file.json").read_text())[key_kind]["key"])
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")

deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(java_pid, 0)
    except ProcessLookupError:
        sys.exit("demo: error: TorchServe exited during start-up; see build/torchserve.out and logs/")
    try:
        status, models = call("http://127.0.0.1:8081/models/clipcap", "management")
        if status == 200 and any(w["status"] == "READY" for w in models[0]["workers"]):
            break
    except (OSError, ValueError):  # not listening yet
        pass
    if time.monotonic() > deadline:
        sys.exit(f"demo: error: the clipcap worker was not ready after {timeout:.0f} s; see logs/model_log.log")
    time.sleep(1)

references = json.loads((samples / "captions.json").read_text()) if (samples / "captions.json").exists() else {}
print("\nCaptions from TorchServe (POST http://127.0.0.1:8080/predictions/clipcap):")
failed = 0
for image in sorted(samples.glob("*.png")):
    status, body = call("http://127.0.0.1:8080/predictions/clipcap", "inference", image.read_bytes(), "image/png")
    if status != 200:
        failed += 1
        print(f"  {image.name:16} ERROR {status}: {body.get('message', body)}")
        continue
    known = references.get(image.name, [])
    mark = "" if not known else "  [a reference caption]" if body["caption"] in known else f"  [reference: {known[0]}]"
    handler_ms = sum(body["timings_ms"].values())
    print(f"  {image.name:16} {body['caption']}{mark}   ({handler_ms:.0f} ms in the handler)")
sys.exit(1 if failed else 0)
PYTHON

images=("$SAMPLES"/*.png)
image=${images[0]}
cat <<EOF

Call the API yourself (token authorization on; TorchServe writes new keys to ./key_file.json at every start):
  export TMPDIR=\$PWD/build/demo-tmp TEMP=\$PWD/build/demo-tmp   # the demo's private pid file and sockets
  .venv/bin/torchserve --start --ncs --ts-config serving/config.properties --models clipcap=clipcap.mar
  KEY=\$(.venv/bin/python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  curl -H "Authorization: Bearer \$KEY" -H "Content-Type: image/png" --data-binary @$image \\
       http://127.0.0.1:8080/predictions/clipcap
  curl -H "Authorization: Bearer \$KEY" -H "Content-Type: application/json" \\
       -d '{"image": "'\$(base64 -w0 $image)'", "decoding": "beam", "beam_size": 3}' \\
       http://127.0.0.1:8080/predictions/clipcap
  curl -s http://127.0.0.1:8082/metrics | grep '^Clipcap'      # custom metrics (no token on the metrics port)
  .venv/bin/python serving/healthcheck.py --key-file key_file.json   # a real caption within 5 s, or exit 1
  .venv/bin/torchserve --stop
More in serving/README.md.
EOF
if [ "${KEEP_SERVER:-0}" = 1 ]; then
  echo "demo: TorchServe is still running (KEEP_SERVER=1): the commands above work now;"
  echo "      stop it from this directory with: TMPDIR=build/demo-tmp .venv/bin/torchserve --stop"
fi
