#!/usr/bin/env bash
# Every check of what is built for cards, in one run on one GPU (at most about 8 minutes
# on an H100 or H200), writing one JSON ($OUT/gpu_check.json) and a short summary
# ($OUT/gpu_check.txt):
#   1. bench: SiT-XL/2 + REG, class and text (77 CLIP states), at batch 32 and 64: ms
#      per step, images/s, MFU, peak memory; `bench --profile` (class, batch 32);
#   2. REG's own PyTorch step on the same card (tools/ref_bench.py over a REG checkout):
#      REG's recipe (fp16 autocast, GradScaler, TF32), bf16 autocast, bf16 autocast with
#      torch.compile; each one's ms per step over ours at the same batch;
#   3. tests/gpu_nccl.sh: 1, 2 and 4 NCCL ranks on the one GPU, overlap on and off, a
#      killed rank;
#   4. tests/gpu_checkpoint.sh: SiT-XL/2 saves, blocking and asynchronous copy;
#   5. the sampler: SDE 250 steps with guidance at batch 64, beside REG's generate.py
#      loop (samplers.euler_maruyama_sampler);
#   6. prepare images/s: SD-VAE and DINOv2-B in the published layouts with random
#      weights (tools/random_published.py), 256 px JPEGs.
# With DEVICE=cpu the same run goes end to end on CPU ranks with tiny settings (the
# suite's miniature, tests/gpu_check.rs), so the card run is not the script's first.
#
# Inputs (environment): OUT (default /tmp/gpu_check), BIN (target/release/reg-ddp), PY
# (python3 with torch 2.11.0), DEVICE (cuda or cpu), REG_DIR (a checkout of
# github.com/Martinser/REG; without it check 2 and REG's half of check 5 are skipped),
# PYDEPS (a folder on PYTHONPATH holding what REG's models/sit.py imports beside torch:
# `pip install --no-deps --target PYDEPS timm==1.0.12 torchvision==0.26.0`, the
# versions REG and torch 2.11 pin). On the card's machine:
#   LD_LIBRARY_PATH=... tools/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
BIN=${BIN:-target/release/reg-ddp}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
REG_DIR=${REG_DIR:-}
PYDEPS=${PYDEPS:-}
mkdir -p "$OUT/parts"
P="$OUT/parts"
TORCH_LIB=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH="$TORCH_LIB:$TORCH_LIB/../../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="${PYDEPS:+$PYDEPS:}${PYTHONPATH:-}"
started=$(date +%s)

if [ "$DEVICE" = cuda ]; then
    if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo '{"skipped": "no GPU"}' > "$OUT/gpu_check.json"
        exit 0
    fi
    CLASS=configs/sit-xl2-reg.yaml
    TEXT=configs/t2i-coco-sit-xl2-reg.yaml
    SETS=(--set train.device=cuda)
    TEXT_SETS=()
    B1=32 B2=64 STEPS=20 WARMUP=5 SAMPLE_B=64 SAMPLE_STEPS=250 SAMPLE_BATCHES=2 IMAGES=2048 THREADS=0
    REF=(--model SiT-XL/2 --input-size 32 --num-classes 1000 --z-dim 768 --projector-dim 2048 --encoder-depth 8)
    RANDOM_SIZE=()
else
    CLASS=configs/demo.yaml
    TEXT=configs/demo.yaml
    SETS=(--set train.device=cpu)
    TEXT_SETS=(--set model.condition=text --set model.text_dim=32 --set model.text_len=8)
    B1=4 B2=8 STEPS=2 WARMUP=1 SAMPLE_B=2 SAMPLE_STEPS=4 SAMPLE_BATCHES=1 IMAGES=4 THREADS=1
    REF=(--depth 4 --hidden 64 --heads 4 --patch 2 --input-size 8 --num-classes 10 --z-dim 32 --projector-dim 64
        --encoder-depth 2)
    RANDOM_SIZE=(--small)
    # SiT-B/2 on CPU ranks takes minutes: the NCCL script's CPU variant trains the demo preset.
    export PRESETS=demo
fi

# run NAME COMMAND...: its stdout, stderr and exit status under $P/NAME.*.
run() {
    local name=$1
    shift
    echo "gpu_check: $name" >&2
    "$@" > "$P/$name.out" 2> "$P/$name.err"
    echo $? > "$P/$name.rc"
}

# 1. bench
for cond in class text; do
    cfg=$CLASS
    extra=()
    if [ $cond = text ]; then cfg=$TEXT; extra=("${TEXT_SETS[@]}"); fi
    for b in $B1 $B2; do
        run "bench-$cond-$b" "$BIN" bench --config "$cfg" --batch "$b" --steps "$STEPS" --warmup "$WARMUP" \
            --threads "$THREADS" "${SETS[@]}" "${extra[@]}"
    done
done
run bench-profile "$BIN" bench --config "$CLASS" --batch "$B1" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" \
    --profile "${SETS[@]}"

# 2. REG's own step on the same device
if [ -n "$REG_DIR" ]; then
    for mode in reg bf16 bf16-compile; do
        for b in $B1 $B2; do
            run "ref-$mode-$b" $PY tools/ref_bench.py --reg-dir "$REG_DIR" --device "$DEVICE" --mode "$mode" "${REF[@]}" \
                --batch "$b" --steps "$STEPS" --warmup "$WARMUP" --threads "${THREADS/#0/16}"
        done
    done
fi

# 3 and 4: the GPU scripts (on CPU: their CPU variants, or their "skipped" JSON)
run nccl env OUT="$P" BIN="$BIN" PY="$PY" DEVICE="$DEVICE" STEPS="$STEPS" bash tests/gpu_nccl.sh
run checkpoint env OUT="$P" BIN="$BIN" PY="$PY" bash tests/gpu_checkpoint.sh

# 5. the sampler
run sample "$BIN" bench --config "$CLASS" --sample --batch "$SAMPLE_B" --sample-steps "$SAMPLE_STEPS" \
    --sample-batches "$SAMPLE_BATCHES" --threads "$THREADS" "${SETS[@]}"
if [ -n "$REG_DIR" ]; then
    ref_sample=("${REF[@]}")
    # REG's sampler hard-codes its null label as 1000.
    [ "$DEVICE" = cpu ] && ref_sample=(--depth 4 --hidden 64 --heads 4 --patch 2 --input-size 8 --num-classes 1000 --z-dim 32
        --projector-dim 64 --encoder-depth 2)
    run ref-sample $PY tools/ref_bench.py --reg-dir "$REG_DIR" --device "$DEVICE" --sample "${ref_sample[@]}" \
        --batch "$SAMPLE_B" --sample-steps "$SAMPLE_STEPS" --steps "$SAMPLE_BATCHES" --warmup 1 --threads "${THREADS/#0/16}"
fi

# 6. prepare
W=$(mktemp -d)
run random-published $PY tools/random_published.py --vae "$W/vae" --encoder "$W/dinov2" "${RANDOM_SIZE[@]}"
run bench-images $PY tools/bench_images.py --out "$W/images" --num "$IMAGES"
t0=$(date +%s.%N)
run prepare "$BIN" prepare --images "$W/images" --out "$W/prepared" --vae "$W/vae" --encoder "$W/dinov2" \
    --precision "$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)"
t1=$(date +%s.%N)
echo "{\"images\": $IMAGES, \"start\": $t0, \"end\": $t1}" > "$P/prepare.time"
rm -rf "$W"

# One JSON from the parts.
$PY - "$OUT" "$DEVICE" "$started" <<'PYEOF'
import glob, json, os, subprocess, sys, time
out, device, started = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = os.path.join(out, "parts")

def last_json(name):
    try:
        lines = [l for l in open(f"{p}/{name}.out").read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except FileNotFoundError:
        return None

def part(name):
    rc = open(f"{p}/{name}.rc").read().strip() if os.path.exists(f"{p}/{name}.rc") else None
    err = open(f"{p}/{name}.err").read().strip().splitlines() if os.path.exists(f"{p}/{name}.err") else []
    return {"rc": None if rc is None else int(rc), "result": last_json(name), "stderr_tail": err[-3:] if rc != "0" else []}

import torch
card = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)}
if device == "cuda":
    card["gpu"] = torch.cuda.get_device_name(0)
    card["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    try:
        card["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        card["driver"] = None
names = sorted(os.path.basename(f)[:-3] for f in glob.glob(f"{p}/*.rc"))
report = {"card": card, "checks": {n: part(n) for n in names}}
for script in ["gpu_nccl", "gpu_checkpoint"]:
    f = f"{p}/{script}.json"
    report[script] = json.load(open(f)) if os.path.exists(f) else None
ratios = {}
for n, c in report["checks"].items():
    if n.startswith("ref-") and n != "ref-sample" and c["result"]:
        batch = c["result"]["batch"]
        ours = report["checks"].get(f"bench-class-{batch}", {}).get("result")
        if ours:
            ratios[n[4:]] = round(c["result"]["ms_per_step"] / ours["ms_per_step"], 3)
ours_s, ref_s = report["checks"].get("sample", {}).get("result"), report["checks"].get("ref-sample", {}).get("result")
if ours_s and ref_s:
    ratios["sampler"] = round(ours_s["images_per_s"] / ref_s["images_per_s"], 3)
report["speedup_over_reference"] = ratios
t = json.load(open(f"{p}/prepare.time"))
ok = report["checks"].get("prepare", {}).get("rc") == 0
report["prepare_images_per_s"] = round(t["images"] / (t["end"] - t["start"]), 2) if ok else None
report["seconds"] = int(time.time()) - started
report["failed"] = [n for n, c in report["checks"].items() if c["rc"] != 0]
json.dump(report, open(f"{out}/gpu_check.json", "w"), indent=1)
lines = [f"{card.get('gpu', card['cpu'])}, torch {card['torch']}, {card['date']}: {report['seconds']} s"]
for n, c in report["checks"].items():
    r = c["result"] or {}
    fig = r.get("ms_per_step") or r.get("images_per_s") or ""
    lines.append(f"  {n:<24} rc {c['rc']}  {fig}")
lines.append(f"  reference / ours (ms per step; sampler: ours / reference in images/s): {ratios}")
lines.append(f"  prepare: {report['prepare_images_per_s']} images/s; failed: {report['failed']}")
open(f"{out}/gpu_check.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
