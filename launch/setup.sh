#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine lacks to build and test reg-ddp.
# Idempotent: a second run checks and returns in seconds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"

# 1. Debian packages: C/C++ toolchain (the ATen shim), libclang + pkg-config (mpi-sys
#    bindings), Open MPI (data-parallel runs and tests), cmake + nasm (turbojpeg-sys
#    builds its vendored libjpeg-turbo, SIMD included: Pillow's JPEG decoder), DejaVu
#    (the labels of the study's plots).
pkgs=(build-essential pkg-config libclang-dev clang openmpi-bin libopenmpi-dev cmake nasm python3-venv ca-certificates curl fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Rust toolchain.
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# 3. Project virtualenv with the pinned torch (its libtorch is what we link) and the
#    test readers (TensorBoard's own event reader, numpy, scipy for the metric
#    references), and the CUDA headers the
#    ATen shim compiles against (crt, cccl: the runtime wheel lacks them).
PY="${PYTHON:-python3}"
[ -x "$VIRTUAL_ENV/bin/python" ] || "$PY" -m venv "$VIRTUAL_ENV"
want="$(cat launch/constraints.txt)"
stamp="$VIRTUAL_ENV/.reg-ddp-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv (torch 2.11.0 is large; first run takes minutes)"
  # pip unpacks the wheels on one core; meanwhile the other compiles the crates that do
  # not need torch (--keep-going skips torch-sys and what depends on it, whose build
  # scripts fail until torch is in place; failures are not cached). The build after
  # set-up reuses what is done. Its own process group, stopped as a whole when pip is
  # done (SIGTERM: a background job of a script ignores SIGINT).
  # Only into an empty .venv: while pip replaces an existing torch, torch-sys's build
  # script could read it half-written.
  prebuild=""
  if [ -f Cargo.toml ] && [ -z "${REG_DDP_NO_PREBUILD:-}" ] && ! "$VIRTUAL_ENV/bin/python" -c 'import torch' 2> /dev/null; then
    setsid cargo build --release --quiet --keep-going -j 1 > /dev/null 2>&1 &
    prebuild=$!
    # Also when pip fails (set -e) or the user interrupts: no cargo left holding target/.
    trap 'kill -TERM -- "-$prebuild" 2> /dev/null || true' EXIT
  fi
  "$VIRTUAL_ENV/bin/pip" install -q --upgrade pip
  "$VIRTUAL_ENV/bin/pip" install -q -c launch/constraints.txt torch numpy scipy tensorboard protobuf nvidia-cuda-crt nvidia-cuda-cccl
  printf '%s' "$want" > "$stamp"
  if [ -n "$prebuild" ]; then
    kill -TERM -- "-$prebuild" 2> /dev/null || true
    wait "$prebuild" 2> /dev/null || true
    trap - EXIT
  fi
fi
"$VIRTUAL_ENV/bin/python" - <<'PY'
import torch, sys
if torch.__version__.split("+")[0] != "2.11.0":
    sys.exit(f"setup: .venv has torch {torch.__version__}, need 2.11.0 (remove .venv and rerun)")
PY
# cudarc loads NCCL as libnccl.so; the wheel ships only libnccl.so.2.
nccl_dir="$("$VIRTUAL_ENV/bin/python" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')"
[ -e "$nccl_dir/libnccl.so" ] || ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
echo "setup: ok"
