#!/usr/bin/env bash
# The latent-space job on an embedded default (launch/demo.sh is the main job, in pixel
# space), through the real pipeline: set up, build in
# release, draw the built-in image set, prepare it (ADM crop, SD-VAE moments, DINOv2
# features; small random VAE and DINOv2 configurations from tests/data, or the
# published weights if you point --vae/--encoder at them), train the tiny CPU preset on
# it. TensorBoard logs and checkpoints land under checkpoints/demo/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
BIN=./target/release/reg-ddp
VAE="${DEMO_VAE:-tests/data/vae_tiny}"
ENCODER="${DEMO_ENCODER:-tests/data/dinov2_tiny}"
[ -d data/demo-images ] || $BIN demo-images --out data/demo-images
# Resumable: finished shards are verified and kept.
$BIN prepare --images data/demo-images --out data/demo --vae "$VAE" --encoder "$ENCODER" \
  --resolution 64 --shard-size 64 --batch 32
$BIN train --config configs/demo.yaml --set data.source=shards --set data.path=data/demo "$@"
echo "demo: TensorBoard logs in checkpoints/demo/tb (tensorboard --logdir checkpoints), checkpoints in checkpoints/demo/step-*"
echo "demo: export the EMA weights with: $BIN export --ckpt checkpoints/demo/step-0000300 --ema --out demo-ema.safetensors"
