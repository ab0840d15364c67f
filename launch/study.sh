#!/usr/bin/env bash
# The REG-with-captions study (docs/study.md): set up, build,
# then {SiT, SiT + REPA, SiT + REG} x {class, caption} x 3 seeds on the procedural shapes
# set in pixel space, scored by the analytic attribute reader. Sized for a 2-core CPU in
# under an hour; `--gpu` runs a bigger model for longer when a GPU is there. Resumable:
# rerun it after an interruption. Outputs: study/study.{csv,png,md} and study/grids/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$REPO/launch/setup.sh"
cd "$REPO"
cargo build --release --quiet
if [ "${1:-}" = "--gpu" ]; then
  shift
  exec ./target/release/reg-ddp study --out study-gpu --gpu --steps 4000 --every 500 --per-class 2000 --eval-num 200 --jobs 1 --threads 8 "$@"
fi
exec ./target/release/reg-ddp study --out study "$@"
