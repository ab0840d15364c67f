#!/usr/bin/env bash
# Proves launch/slurm/train.sbatch on a real single-node SLURM cluster (Debian's
# slurm-wlm + munge, started here): a 2-task CPU job trains; USR1 makes it
# checkpoint, and the requeued job resumes and finishes. Run by ./launch/test.sh when
# SLURM_TESTS=1 (it installs the packages and takes a few minutes).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/env.sh"
cd "$REPO"
log() { echo "slurm-test: $*"; }

pkgs=(slurm-wlm munge)
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null; break; }
done

W="$(mktemp -d /tmp/reg-slurm.XXXXXX)"
HOST="$(hostname -s)"
cleanup() {
  scancel --quiet --user=root 2>/dev/null || true
  [ -f "$W/slurmd.pid" ] && kill "$(cat "$W/slurmd.pid")" 2>/dev/null || true
  [ -f "$W/slurmctld.pid" ] && kill "$(cat "$W/slurmctld.pid")" 2>/dev/null || true
  pkill -f "munged --socket=$W" 2>/dev/null || true
}
trap cleanup EXIT

# munge: a key of our own and a daemon on our own socket.
mkdir -p "$W/munge" "$W/state" "$W/spool" "$W/out"
dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$W/munge"; chmod 400 "$W/munge/munge.key"
munged --socket="$W/munge/socket" --key-file="$W/munge/munge.key" --pid-file="$W/munge/pid" \
  --log-file="$W/munge/log" --seed-file="$W/munge/seed" --force
export MUNGE_SOCKET="$W/munge/socket"

CPUS="$(nproc)"
MEM="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"
cat > "$W/slurm.conf" <<CONF
ClusterName=regtest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$W/munge/socket
CredType=cred/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
export SLURM_CONF="$W/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix" && break; sleep 1; done
sinfo
cargo build --release --quiet

submit() { sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --time=10 \
  --chdir="$W/out" --output="$W/out/%x-%j.out" launch/slurm/train.sbatch "$REPO/configs/demo.yaml" \
  --set "train.output_dir=$W/out/runs" --threads 1 "$@"; }
state_of() { scontrol show job "$1" -o 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_done() {  # job id, seconds
  for _ in $(seq "$2"); do
    s="$(state_of "$1")"
    case "$s" in COMPLETED) return 0 ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) log "job $1 $s"; cat "$W"/out/*-"$1".out; return 1 ;; esac
    # A requeued job waits for its begin time; let it start now.
    if [ "$s" = PENDING ]; then scontrol update jobid="$1" StartTime=now 2>/dev/null || true; fi
    sleep 1
  done
  log "job $1 did not finish in $2 s (state $(state_of "$1"))"; cat "$W"/out/*-"$1".out; return 1
}

# 1. A short job trains to the end.
j1="$(submit --set train.name=short --set train.steps=30)"
wait_done "$j1" 300
grep -q '"state":"done"' "$W/out/runs/short/status.json"
[ -f "$W/out/runs/short/step-0000030/manifest.json" ]
log "short job $j1 trained 30 steps"

# 2. USR1 (what --signal=B:USR1@120 delivers) makes a long job checkpoint; the
#    requeued job resumes from it and finishes.
j2="$(submit --set train.name=long --set train.steps=3000 --set train.checkpoint_every=100000)"
for _ in $(seq 300); do [ "$(state_of "$j2")" = RUNNING ] && [ -d "$W/out/runs/long/tb" ] && break; sleep 1; done
sleep 8
scancel --batch --signal=USR1 "$j2"
for _ in $(seq 120); do grep -q "requeueing" "$W/out/"*-"$j2".out 2>/dev/null && break; sleep 1; done
grep -q "USR1 received" "$W/out/"*-"$j2".out
grep -q "requeueing" "$W/out/"*-"$j2".out
stopped="$(ls -d "$W"/out/runs/long/step-* | head -1)"
[ -f "$stopped/manifest.json" ]
log "USR1: checkpoint $(basename "$stopped"), job requeued"
wait_done "$j2" 600
grep -q "resumed from .*$(basename "$stopped")" "$W/out/"*-"$j2".out
grep -q '"state":"done"' "$W/out/runs/long/status.json"
[ -f "$W/out/runs/long/step-0003000/manifest.json" ]
log "requeued job $j2 resumed from $(basename "$stopped") and finished 3000 steps"
rm -rf "$W/out"
echo "1 passed, 0 failed: slurm train.sbatch (train, USR1 checkpoint, requeue + resume)"
