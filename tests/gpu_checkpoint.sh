#!/usr/bin/env bash
# GPU check of checkpoint saving (issue 14): SiT-XL/2 on one GPU with the blocking host
# copy and with `train.async_checkpoint_copy` (pinned memory, side stream). Writes one
# JSON to ${OUT:-/tmp}/gpu_checkpoint.json: per mode, how long each save held the step
# loop (blocking_ms), when it was committed (committed_s), the step time around saves,
# and whether the async checkpoint resumes and matches the blocking one.
# Run on a machine with a GPU, from the repository root, with target/release/reg-ddp
# built; skipped (exit 0, "skipped" in the JSON) without a GPU.
set -euo pipefail
OUT=${OUT:-/tmp}
BIN=${BIN:-target/release/reg-ddp}
PY=${PY:-python3}
TORCH_LIB=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH="$TORCH_LIB:$TORCH_LIB/../../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"skipped": "no GPU"}' > "$OUT/gpu_checkpoint.json"
    exit 0
fi
WORK=$(mktemp -d)
COMMON=(--config configs/sit-xl2-reg.yaml --json --set train.device=cuda --set data.source=synthetic --set data.path=null
    --set train.global_batch=32 --set train.steps=30 --set train.checkpoint_every=10 --set train.log_every=1
    --set train.output_dir="$WORK" --set sample.every=0 --set eval.fid_every=0)
for mode in blocking async; do
    extra=()
    [ "$mode" = async ] && extra=(--set train.async_checkpoint_copy=true)
    "$BIN" train "${COMMON[@]}" --set train.name="$mode" "${extra[@]}" > "$WORK/$mode.jsonl"
done
# The async step-10 checkpoint resumes, and its weights match the blocking run's.
"$BIN" train "${COMMON[@]}" --set train.name=async --set train.steps=12 --resume "$WORK/async/step-0000010" > "$WORK/resumed.jsonl"
for mode in blocking async; do
    "$BIN" export --ckpt "$WORK/$mode/step-0000010" --out "$WORK/$mode-10.safetensors"
done
$PY - "$WORK" "$OUT/gpu_checkpoint.json" <<'EOF'
import json, sys, datetime, torch
from safetensors.torch import load_file
work, out = sys.argv[1], sys.argv[2]
res = {"card": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "model": "SiT-XL/2", "batch": 32}
for mode in ["blocking", "async"]:
    lines = [json.loads(l) for l in open(f"{work}/{mode}.jsonl") if l.startswith("{")]
    saves = [l for l in lines if "checkpoint_step" in l]
    steps = {l["step"]: l["step_ms"] for l in lines if "step_ms" in l}
    res[mode] = {"saves": saves, "step_ms_after_save": [steps.get(s["checkpoint_step"] + 1) for s in saves],
                 "median_step_ms": sorted(steps.values())[len(steps) // 2]}
a, b = load_file(f"{work}/async-10.safetensors"), load_file(f"{work}/blocking-10.safetensors")
res["async_vs_blocking_step10_max_rel"] = max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item() for k in b)
res["resumed_ok"] = any("loss" in json.loads(l) for l in open(f"{work}/resumed.jsonl") if l.startswith("{"))
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
EOF
