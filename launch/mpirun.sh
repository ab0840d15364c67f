#!/usr/bin/env bash
# Data-parallel training on this machine: launch/mpirun.sh NPROC CONFIG [train args...]
# One rank per GPU when CUDA is present (cuda:{local rank}, NCCL), else CPU ranks (MPI).
# Sets what Open MPI needs as root, in containers and with more ranks than cores.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/mpirun.sh NPROC CONFIG [train args...]" >&2
  exit 2
fi
np="$1"; config="$2"; shift 2
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec mpirun -np "$np" --bind-to none "$REPO/target/release/reg-ddp" train --config "$config" "$@"
