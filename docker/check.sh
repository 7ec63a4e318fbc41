#!/usr/bin/env bash
# The release check of the CPU image (docs/cluster.md): build docker/Dockerfile.cpu with
# podman or docker (whichever is installed), run `vlrlhf demo` inside it, print the demo's
# table, the image's size and how long each part took. Not part of `make test` (minutes);
# the suite lints both Dockerfiles and tests the installed wheel the image is made of.
#
#   docker/check.sh                 # from anywhere; builds vlrlhf:check-cpu
#
# Settings (environment):
#   IMAGE            tag to build (vlrlhf:check-cpu)
#   INDEX_URL        package index for pip (empty: the host's pip configuration, else PyPI)
#   TORCH_INDEX_URL  torch's CPU wheel index (default: download.pytorch.org's, or none
#                    when the host's pip configuration is passed in)
#   HOST_PIP_CONFIG  1 (default with podman): pass the host's pip configuration (indexes,
#                    find-links folders, CA bundle) into the build, read-only; 0: do not
#   BASE_IMAGE       the base (python:3.11.7-slim-bookworm). Where no registry can be
#                    reached and mmdebstrap is installed, a Debian bookworm root file
#                    system with Python stands in for it (built once, ~1 min).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-vlrlhf:check-cpu}
BASE_IMAGE=${BASE_IMAGE:-python:3.11.7-slim-bookworm}
ENGINE=$(command -v podman || command -v docker || true)
[ -n "$ENGINE" ] || { echo "check.sh: neither podman nor docker is installed" >&2; exit 2; }
ENGINE_NAME=$(basename "$ENGINE")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
BUILD=(build --network host "${ULIMITS[@]}")
RUN=(run --rm --network host "${ULIMITS[@]}")
if [ "$ENGINE_NAME" = podman ]; then
  BUILD+=(--pull=never)
  if command -v runc >/dev/null; then  # crun fails where cgroups run in hybrid mode
    BUILD+=(--runtime runc); RUN=(--runtime runc "${RUN[@]}")
  fi
fi

# ---- the base image: present, pulled, or a stand-in made with mmdebstrap
if ! "$ENGINE" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
   && ! "$ENGINE" pull "$BASE_IMAGE" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || { echo "check.sh: cannot pull $BASE_IMAGE and no mmdebstrap to make one" >&2; exit 2; }
  echo "== $BASE_IMAGE cannot be pulled: a Debian bookworm root file system with Python stands in"
  mmdebstrap --quiet --variant=minbase --aptopt='Acquire::Check-Valid-Until "false"' \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase,tzdata \
    bookworm "$WORK/rootfs.tar"
  "$ENGINE" import "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null
  [ "$ENGINE_NAME" = podman ] && "$ENGINE" tag "$BASE_IMAGE" "docker.io/library/$BASE_IMAGE"
  rm -f "$WORK/rootfs.tar"
fi

# ---- the host's pip configuration, passed in read-only (podman build -v)
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "INDEX_URL=${INDEX_URL:-}")
HOST_PIP_CONFIG=${HOST_PIP_CONFIG:-$([ "$ENGINE_NAME" = podman ] && echo 1 || echo 0)}
if [ "$HOST_PIP_CONFIG" = 1 ] && [ -n "$(python3 -m pip config list 2>/dev/null)" ]; then
  python3 - "$WORK/pip.conf" "$WORK/mounts" <<'PY'
import configparser, os, subprocess, sys
keys = ("index-url", "extra-index-url", "find-links", "cert", "trusted-host", "timeout", "default-timeout")
found = {}
for line in subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout.splitlines():
    name, _, value = line.partition("=")
    key = name.rsplit(".", 1)[-1]
    if key in keys:
        found.setdefault(key, value.strip().strip("'\""))
config = configparser.ConfigParser()
config["global"] = found
with open(sys.argv[1], "w") as f:
    config.write(f)
paths = set()
for value in found.values():
    for item in value.split():
        path = item[len("file://"):] if item.startswith("file://") else item
        if path.startswith("/") and os.path.exists(path):
            # a local index's pages link to files beside it (/opt/pypi/simple -> /opt/pypi/files)
            paths.add(os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "simple" else path)
with open(sys.argv[2], "w") as f:
    f.writelines(f"{path}\n" for path in sorted(paths))
PY
  BUILD+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
  while read -r path; do [ -n "$path" ] && BUILD+=(-v "$path:$path:ro"); done < "$WORK/mounts"
  BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
  echo "== pip inside the build uses this host's configuration: $(tr '\n' ' ' < "$WORK/pip.conf")"
elif [ -n "${TORCH_INDEX_URL+set}" ]; then
  BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
fi

# ---- build
started=$(date +%s)
echo "== $ENGINE_NAME build -f docker/Dockerfile.cpu -t $IMAGE"
"$ENGINE" "${BUILD[@]}" "${BUILD_ARGS[@]}" -f "$ROOT/docker/Dockerfile.cpu" -t "$IMAGE" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; echo "check.sh: the build failed" >&2; exit 1; }
built=$(date +%s)
size=$("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}')
echo "== built in $((built - started)) s; image size $(python3 -c "print(f'{$size / 1e9:.2f} GB')")"

# ---- the demo inside, with a /dev/shm that holds Ray's object store (30% of memory)
shm_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.35}' /proc/meminfo)
echo "== $ENGINE_NAME run --shm-size=${shm_mb}m $IMAGE demo"
"$ENGINE" "${RUN[@]}" --shm-size="${shm_mb}m" "$IMAGE" demo --no-dashboard > "$WORK/demo.log" 2>&1 \
  || { tail -n 60 "$WORK/demo.log"; echo "check.sh: vlrlhf demo failed inside the image" >&2; exit 1; }
ran=$(date +%s)
if grep -q "/dev/shm" "$WORK/demo.log"; then grep "/dev/shm" "$WORK/demo.log" | head -n 3; fi
sed -n '/^held-out shapes test set/,$p' "$WORK/demo.log"
echo "== demo inside the image: $((ran - built)) s; build $((built - started)) s; image $(python3 -c "print(f'{$size / 1e9:.2f} GB')")"
