#!/usr/bin/env bash
# The main job on an embedded default, through the real pipeline (docs/study.md): set up, build in release, draw the procedural
# shapes set (demo-images --captioned --fix: one white, large shape in the top-left
# quadrant of each 32 px image, so that only the shape varies; class = shape), train the
# small shapes encoder on a disjoint split (the REG token's and REPA's targets), prepare
# the images as identity:4 latents with its features, train SiT + REG for 1,000 steps
# (configs/demo-shapes.yaml), and end with a grid of EMA samples, one column per shape,
# scored by the analytic attribute reader. About 2.5 minutes on 2 cores after the
# build; resumable. The latent-space job (SD-VAE + DINOv2 layout) is launch/demo-latent.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
BIN=./target/release/reg-ddp
D=data/shapes-demo-src
FIX=colour=white,size=large,position=top_left
[ -f $D/train/attributes.jsonl ] || $BIN demo-images --captioned --split train --per-class 400 --fix $FIX --out $D/train
[ -f $D/encoder/attributes.jsonl ] || $BIN demo-images --captioned --split encoder --per-class 400 --fix $FIX --out $D/encoder
[ -f data/shapes-demo-encoder/model.safetensors ] ||
  $BIN train-encoder --images $D/encoder --out data/shapes-demo-encoder --patch 4 --resolution 32 --steps 200
# Resumable: finished shards are verified and kept.
$BIN prepare --images $D/train --out data/shapes-demo --vae identity:4 --encoder data/shapes-demo-encoder \
  --encoder-resolution 32 --resolution 32 --shard-size 512 --batch 64
$BIN train --config configs/demo-shapes.yaml --resume auto "$@"
RUN=checkpoints/shapes-demo
LAST=$(ls -d $RUN/step-* | sort | tail -1)
# 40 EMA samples: image i asked for shape i % 5 (cross, disc, ring, square, triangle in
# class order), 8 of each; the grid has one column per shape. 32 Heun steps: fewer
# leave pixel noise that hides the shapes.
rm -rf $RUN/demo-samples $RUN/demo-samples.npz
$BIN sample --ckpt "$LAST" --ema --vae identity:4 --labels balanced --num 40 --mode ode --heun --steps 32 \
  --cfg 2.0 --cls-cfg 2.0 --interval 0,1 --out $RUN/demo-samples --batch 40 --device cpu --grid 5
# What each image was asked for (its shape), for the attribute reader.
classes=($(ls $D/train | grep -v jsonl | sort))
for i in $(seq 0 39); do echo "{\"shape\": \"${classes[$((i % 5))]}\"}"; done > $RUN/demo-wanted.jsonl
$BIN score-shapes --samples $RUN/demo-samples --attributes $RUN/demo-wanted.jsonl --real $D/train/attributes.jsonl
echo "demo: EMA samples of $LAST in $RUN/demo-samples.grid.png, one column per shape: ${classes[*]}"
echo "demo: TensorBoard grids during training in $RUN/tb (tensorboard --logdir checkpoints)"
