"""Benchmark of the original REG (PyTorch) training step and sampler loop, for comparing
against our Rust trainer on the same machine (CPU threads or one GPU).

It imports the reference code (models/sit.py, loss.py) from a checkout of
https://github.com/Martinser/REG and times exactly the per-step work of REG's
train.py (minus data loading and the frozen vision encoder, whose outputs are
replaced by fixed random tensors): sample_posterior, SILoss (v-prediction,
linear path, uniform t), loss = denoise + 0.5 * proj + 0.03 * cls, backward,
clip_grad_norm_(1.0), AdamW(lr 1e-4, wd 0), zero_grad, EMA update (0.9999).

Setup (separate venv; needs torch + timm):
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install -c cons.txt torch==2.11.0 torchvision==0.26.0 timm
Run:
    /tmp/refvenv/bin/python tools/ref_bench.py --reg-dir /tmp/REG --model SiT-B/2 \
        --input-size 32 --batch 4 --steps 5 --warmup 1 --threads 2
    /tmp/refvenv/bin/python tools/ref_bench.py --reg-dir /tmp/REG --depth 4 --hidden 64 \
        --heads 4 --patch 2 --input-size 8 --num-classes 10 --z-dim 32 \
        --projector-dim 64 --encoder-depth 2 --batch 16 --steps 50 --warmup 5 --threads 2
Modes (--mode): fp32; reg (REG's recipe: fp16 autocast as Accelerate's
mixed_precision="fp16" wraps the model's forward, GradScaler, TF32 on); bf16 (bf16
autocast); bf16-compile (bf16 autocast, the model under torch.compile). --sample times
REG's generate.py loop instead: samplers.euler_maruyama_sampler, --sample-steps steps,
guidance --cfg on both outputs (interval [0, 0.85]), on a model of 1000 classes (its null
label is hard-coded).
Prints one JSON line with ms_per_step and images_per_s (or the sampler's images_per_s).
"""
import argparse
import copy
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reg-dir", default="/tmp/REG")
    ap.add_argument("--model", default=None, help="REG preset, e.g. SiT-B/2 (else custom sizes)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--z-dim", type=int, default=768)
    ap.add_argument("--projector-dim", type=int, default=2048)
    ap.add_argument("--encoder-depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="fp32", choices=["fp32", "reg", "bf16", "bf16-compile"])
    ap.add_argument("--sample", action="store_true", help="time REG's sampler loop instead of the step")
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=2.3)
    a = ap.parse_args()

    sys.path.insert(0, a.reg_dir)
    import torch
    from models.sit import SiT, SiT_models
    from loss import SILoss

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    if a.mode == "reg" and dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    half = {"reg": torch.float16, "bf16": torch.bfloat16, "bf16-compile": torch.bfloat16}.get(a.mode)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Same kwargs as REG train.py (fused_attn=True, qk_norm=False defaults; cfg_prob 0.1 > 0).
    common = dict(input_size=a.input_size, num_classes=a.num_classes, use_cfg=True,
                  z_dims=[a.z_dim], projector_dim=a.projector_dim,
                  encoder_depth=a.encoder_depth, fused_attn=True, qk_norm=False)
    if a.model:
        model = SiT_models[a.model](**common)
        name = a.model
        patch = model.patch_size
    else:
        model = SiT(depth=a.depth, hidden_size=a.hidden, decoder_hidden_size=a.hidden,
                    patch_size=a.patch, num_heads=a.heads, class_dropout_prob=0.1, **common)
        name = f"custom-d{a.depth}-h{a.hidden}-nh{a.heads}-p{a.patch}"
        patch = a.patch
    model = model.float().train().to(dev)
    if a.sample:
        return sample(a, model, patch, dev, sync, name)
    forward = torch.compile(model) if a.mode == "bf16-compile" else model

    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    ema.eval()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    scaler = torch.amp.GradScaler(dev.type, enabled=a.mode == "reg")
    latents_scale = torch.full((1, 4, 1, 1), 0.18215, device=dev)
    latents_bias = torch.zeros(1, 4, 1, 1, device=dev)

    # Fixed random "dataset" batch: VAE moments, encoder features (cls + patch tokens), labels.
    B, H = a.batch, a.input_size
    T = (H // patch) ** 2
    moments = torch.randn(B, 8, H, H, device=dev)
    feats = torch.randn(B, T + 1, a.z_dim, device=dev)
    labels = torch.randint(0, a.num_classes, (B,), device=dev)
    params = list(model.parameters())
    named = list(model.named_parameters())
    ema_named = dict(ema.named_parameters())

    def step():
        with torch.no_grad():
            mean, std = torch.chunk(moments, 2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * latents_scale + latents_bias
            zs = [feats]
            cls_token = feats[:, 0]
        with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
            loss1, proj1, _, _, loss2 = loss_fn(forward, x, dict(y=labels), zs=zs,
                                                cls_token=cls_token, time_input=None, noises=None)
        loss = loss1.mean() + 0.5 * proj1.mean() + 0.03 * loss2.mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in named:
                ema_named[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        return loss.detach()

    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({"impl": "reg-pytorch", "mode": a.mode, "device": a.device, "model": name, "batch": B, "threads": a.threads,
                      "ms_per_step": round(dt * 1e3, 3), "images_per_s": round(B / dt, 3),
                      "params": sum(p.numel() for p in params), "torch": torch.__version__,
                      "final_loss": round(loss.item(), 5)}))


def sample(a, model, patch, dev, sync, name):
    """REG's generate.py loop: euler_maruyama_sampler on a batch, in the model's fp32
    (generate.py samples without autocast)."""
    import argparse as ap
    import torch
    from samplers import euler_maruyama_sampler

    model.eval()
    args = ap.Namespace(cls_cfg_scale=a.cfg, num_classes=a.num_classes, cls=a.z_dim)
    n, h = a.batch, a.input_size

    def run():
        z = torch.randn(n, 4, h, h, device=dev)
        y = torch.randint(0, a.num_classes, (n,), device=dev)
        cls_z = torch.randn(n, a.z_dim, device=dev)
        with torch.no_grad():
            return euler_maruyama_sampler(model=model, latents=z, y=y, num_steps=a.sample_steps, heun=False,
                                          cfg_scale=a.cfg, guidance_low=0.0, guidance_high=0.85,
                                          path_type="linear", cls_latents=cls_z, args=args)

    for _ in range(a.warmup):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        run()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({"impl": "reg-pytorch-sampler", "device": a.device, "model": name, "batch": n,
                      "sample_steps": a.sample_steps, "cfg": a.cfg, "seconds_per_batch": round(dt, 4),
                      "images_per_s": round(n / dt, 3)}))


if __name__ == "__main__":
    main()
