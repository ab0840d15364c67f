#!/usr/bin/env bash
# Set up, build, and run the whole test suite (unit, golden, CLI, TensorBoard, MPI).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
cargo test --release -- --test-threads=1
# The SLURM proof starts a one-node cluster here (root, a few minutes): opt-in.
if [ "${SLURM_TESTS:-0}" = 1 ]; then
  "$REPO/tests/slurm_test.sh"
fi
