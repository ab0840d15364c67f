#!/usr/bin/env bash
# Set up, build, and run the whole test suite (unit, golden, CLI, TensorBoard, MPI).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
cargo test --release -- --test-threads=1
