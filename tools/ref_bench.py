"""CPU benchmark of the original REG (PyTorch) training step, for comparing
against our Rust trainer at an equal thread count.

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
Prints one JSON line with ms_per_step and images_per_s.
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
    a = ap.parse_args()

    sys.path.insert(0, a.reg_dir)
    import torch
    from models.sit import SiT, SiT_models
    from loss import SILoss

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

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
    model = model.float().train()

    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    ema.eval()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    latents_scale = torch.full((1, 4, 1, 1), 0.18215)
    latents_bias = torch.zeros(1, 4, 1, 1)

    # Fixed random "dataset" batch: VAE moments, encoder features (cls + patch tokens), labels.
    B, H = a.batch, a.input_size
    T = (H // patch) ** 2
    moments = torch.randn(B, 8, H, H)
    feats = torch.randn(B, T + 1, a.z_dim)
    labels = torch.randint(0, a.num_classes, (B,))
    params = list(model.parameters())
    named = list(model.named_parameters())
    ema_named = dict(ema.named_parameters())

    def step():
        with torch.no_grad():
            mean, std = torch.chunk(moments, 2, dim=1)
            x = (mean + std * torch.randn_like(mean)) * latents_scale + latents_bias
            zs = [feats]
            cls_token = feats[:, 0]
        loss1, proj1, _, _, loss2 = loss_fn(model, x, dict(y=labels), zs=zs,
                                            cls_token=cls_token, time_input=None, noises=None)
        loss = loss1.mean() + 0.5 * proj1.mean() + 0.03 * loss2.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in named:
                ema_named[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        return loss.detach()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    dt = (time.perf_counter() - t0) / a.steps
    print(json.dumps({"impl": "reg-pytorch", "model": name, "batch": B, "threads": a.threads,
                      "ms_per_step": round(dt * 1e3, 3), "images_per_s": round(B / dt, 3),
                      "params": sum(p.numel() for p in params), "torch": torch.__version__,
                      "final_loss": round(loss.item(), 5)}))


if __name__ == "__main__":
    main()
