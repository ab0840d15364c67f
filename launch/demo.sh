#!/usr/bin/env bash
# The main job on an embedded default: set up, build in release, train the tiny CPU
# preset. TensorBoard logs and checkpoints land under checkpoints/demo/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
./target/release/reg-ddp train --config configs/demo.yaml "$@"
echo "demo: TensorBoard logs in checkpoints/demo/tb (tensorboard --logdir checkpoints), weights in checkpoints/demo/step-*"
