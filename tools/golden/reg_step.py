"""Golden training steps of REG's own code for tests/golden.rs: forward, loss, gradients, clipped AdamW + EMA.

Each case is a small SiT + REG built by REG's `models/sit.py` (github.com/Martinser/REG,
checked with commit 021ea2e), its settings taken from REG's own `parse_args` (train.py)
given the case's command-line flags, and two iterations of what `train.py`'s loop does:
`sample_posterior` of random VAE moments, REG's `SILoss` in training mode, the loss
`loss1.mean() + proj_coeff * proj + cls * loss2.mean()`, `clip_grad_norm_`,
`torch.optim.AdamW` as train.py builds it, and REG's `update_ema` (the EMA starts as
train.py starts it: a deep copy, then `update_ema(decay=0)`). Two, because the first
Adam step from zero moments does not depend on the betas.

One change to REG's code, on the cosine path only: its REG-token target broadcasts
across the batch there (see COSINE_CLS_LINE); the generator patches that one line in
memory and runs everything else as it is.

Every random draw REG's code makes inside the step (the posterior noise, the time, the
latent and REG-token noise, the label-dropout draw) is recorded from the call that made
it, so the Rust test takes its randomness from the file. Weights: REG's initialisation
from a seeded global generator, then every tensor it initialises to zero (adaLN, the
output layers, biases) drawn from N(0, 0.05), so that every parameter sees a gradient.

Writes tests/data/<case>.json (settings) and tests/data/<case>.safetensors:

    <param name>                REG's weights before the first step (pos_embed included)
    in.x, in.t, in.y, in.cls    a forward input (eval mode, labels may be the null label)
    out.x, out.zs0, out.cls     REG's forward on it
    draw.moments, draw.eps      VAE moments [mean; std] and the posterior noise
    draw.time                   the time draw: torch.rand (uniform) or torch.randn (lognormal)
    draw.labels, draw.drop      labels before dropout and the dropout draw (torch.rand)
    loss.x0                     sample_posterior's latents (scale 0.18215, train.py's)
    loss.feat, loss.cls0        encoder tokens (class token first) and that class token
    loss.time, loss.noise, loss.noise_cls, loss.y    what SILoss used (loss.y after dropout)
    loss.denoise, loss.cls, loss.proj, loss.total    REG's loss terms
    grad.<name>                 every gradient before clipping
    step.grad_norm              clip_grad_norm_'s total norm
    step.param.<name>, step.ema.<name>               weights and EMA after the step
    s2.<key>                    the second step's draw.*, loss.* and step.* (no gradients)

The original case tests/data/reg_tiny.* predates this script and its seeds are not
known; it is not rewritten. Instead its weights and inputs are replayed through the
same REG code (eval mode, the file's time and noise handed to REG's draws) and every
output compared with the file at the tolerances of tests/golden.rs; the script fails if
one is off. Its settings are merged into reg_tiny.json (keys it has must agree).

Needs the golden virtualenv of tools/golden/reg_interop.py (torch==2.11.0,
safetensors==0.8.0, numpy==2.4.6) with timm at REG's own pin, 1.0.12 (its
requirements.txt): with the venv's timm 1.0.31, `Attention(qk_norm=True)` asserts that
a `norm_layer` is given, which REG's `SiTBlock` does not do, so REG's `--qk-norm` model
cannot be built (1.0.12 defaults it to LayerNorm). timm 1.0.12 goes in a folder of its
own, leaving the venv's timm to reg_interop.py:

    /tmp/goldvenv/bin/pip install --no-deps --target /tmp/timm-1.0.12 timm==1.0.12
    PYTHONPATH=/tmp/timm-1.0.12 /tmp/goldvenv/bin/python tools/golden/reg_step.py /path/to/REG   # from the repository root

CPU only, a few seconds; the same torch gives the same bits.
"""

import argparse
import copy
import json
import pathlib
import sys
from collections import OrderedDict

import timm
import torch
from safetensors.torch import load_file, save_file

assert timm.__version__ == "1.0.12", f"timm {timm.__version__}: REG pins 1.0.12 (see the set-up above)"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reg_interop import functions_from  # noqa: E402  (REG's train.py functions, run unchanged)

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "tests/data"
# train.py's fixed SD-VAE latent statistics (`latents_scale`, `latents_bias` in its main).
LATENT_SCALE = 0.18215
# Widths REG's presets do not have; the rest of the settings come from REG's flags.
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, z_dim=8, projector_dim=16,
             batch=3)
BASE = ["--num-classes", "10", "--encoder-depth", "1"]
# name -> (widths, REG flags, EMA decay, seed). Optimiser, clip and loss weights differ
# between cases so that a setting the test ignores shows up as a mismatch. Most EMA
# decays are low for the same reason: after two steps of about lr = 1e-4 the EMA of
# decay d has moved (1 - d) * 1e-4, below the test's 1e-6 for REG's own 0.9999.
CASES = {
    "reg_qknorm": (SMALL, BASE + ["--qk-norm"], 0.9999, 1),
    "reg_cosine": (SMALL, BASE + ["--path-type", "cosine", "--learning-rate", "3e-4", "--adam-weight-decay", "0.1"], 0.9, 2),
    "reg_lognormal": (SMALL, BASE + ["--weighting", "lognormal", "--learning-rate", "1e-3", "--adam-beta1", "0.8", "--adam-beta2", "0.95",
                                     "--adam-epsilon", "1e-6"], 0.5, 3),
    "reg_cosine_lognormal": (SMALL, BASE + ["--path-type", "cosine", "--weighting", "lognormal"], 0.99, 4),
    "reg_encoder_full": (SMALL, ["--num-classes", "10", "--encoder-depth", "2", "--max-grad-norm", "0.25"], 0.9999, 5),
    "reg_patch4": (dict(SMALL, patch_size=4), BASE + ["--proj-coeff", "1.0", "--cls", "0.1"], 0.9, 6),
    # Nothing a power of two: 7 classes, a 3x3 token grid, 3 heads of 4, encoder width 6, batch 5.
    "reg_classes7": (dict(SMALL, input_size=6, hidden_size=12, num_heads=3, z_dim=6, projector_dim=20, batch=5),
                     ["--num-classes", "7", "--encoder-depth", "1", "--max-grad-norm", "0.5"], 0.75, 7),
}
# tests/golden.rs's tolerances, for the replay of reg_tiny.
TOL = dict(pos_embed=1e-6, out=1e-5, loss=1e-5, grad=1e-4, grad_norm=1e-5, step_abs=1e-6)


class Draws:
    """Wraps the torch sampling calls REG's step makes and logs what each returned; with
    `replay`, the calls return those tensors in order instead (each the size asked for)."""

    NAMES = ("rand", "randn", "randn_like")

    def __init__(self, replay=None):
        self.replay = list(replay) if replay is not None else None
        self.log = []

    def __enter__(self):
        self.saved = {n: getattr(torch, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch, n, self.wrap(n, self.saved[n]))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch, n, f)

    def wrap(self, name, real):
        def draw(*a, **k):
            out = real(*a, **k)
            if self.replay is not None:
                assert self.replay, f"REG drew more than was given ({name})"
                given = self.replay.pop(0)
                assert given.numel() == out.numel(), f"{name}: REG drew {list(out.shape)}, given {list(given.shape)}"
                out = given.reshape(out.shape).to(out.dtype).clone()
            self.log.append((name, out.detach().clone()))
            return out
        return draw


def reg_settings(reg, flags):
    env = functions_from(reg / "train.py", ["parse_args", "update_ema", "sample_posterior"],
                         {"argparse": argparse, "OrderedDict": OrderedDict, "torch": torch})
    return env["parse_args"](["--exp-name", "golden", *flags]), env


def build(SiT, w, args, seed):
    """REG's model as train.py builds it, at the case's widths."""
    torch.manual_seed(seed)
    model = SiT(input_size=w["input_size"], patch_size=w["patch_size"], in_channels=w["in_channels"],
                hidden_size=w["hidden_size"], decoder_hidden_size=w["hidden_size"], depth=w["depth"],
                num_heads=w["num_heads"], num_classes=args.num_classes, use_cfg=(args.cfg_prob > 0), z_dims=[w["z_dim"]],
                projector_dim=w["projector_dim"], encoder_depth=args.encoder_depth, fused_attn=args.fused_attn,
                qk_norm=args.qk_norm)
    return model


def settings(model, w, args, ema_decay, flags):
    return {
        "input_size": w["input_size"], "patch_size": w["patch_size"], "in_channels": w["in_channels"],
        "hidden_size": w["hidden_size"], "decoder_hidden_size": w["hidden_size"], "depth": w["depth"],
        "num_heads": w["num_heads"], "encoder_depth": args.encoder_depth, "num_classes": args.num_classes,
        "class_dropout_prob": model.y_embedder.dropout_prob, "z_dims": [w["z_dim"]], "projector_dim": w["projector_dim"],
        "qk_norm": args.qk_norm, "mlp_ratio": 4.0, "batch": w["batch"], "tokens": model.x_embedder.num_patches + 1,
        # Loss: REG's --proj-coeff and --cls (its REG-token weight, our cls_coeff).
        "proj_coeff": args.proj_coeff, "cls_coeff": args.cls, "path_type": args.path_type, "weighting": args.weighting,
        "prediction": args.prediction, "latent_scale": LATENT_SCALE,
        "learning_rate": args.learning_rate, "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon, "adam_weight_decay": args.adam_weight_decay,
        "max_grad_norm": args.max_grad_norm, "ema_decay": ema_decay, "reg_flags": flags,
    }


# REG's loss.py on the cosine path: `d_alpha_t` and `d_sigma_t` are [B, 1, 1, 1] tensors
# there (on the linear path plain numbers), so `cls_target` broadcasts against the [B, D]
# REG token to [B, 1, B, D], and sample i's REG-token loss averages the targets of every
# sample of the batch taken at sample i's time. `cls_input` two lines above squeezes
# alpha_t and sigma_t to [B, 1] for exactly this; the target is patched to do the same.
# Our loss computes the per-sample target; the linear path runs REG's file unchanged.
COSINE_CLS_LINE = "cls_target = d_alpha_t * cls_token + d_sigma_t * noises_cls"
COSINE_CLS_FIX = ("cls_target = d_alpha_t.squeeze(-1).squeeze(-1) * cls_token"
                  " + d_sigma_t.squeeze(-1).squeeze(-1) * noises_cls")


def reg_loss_class(reg, path_type):
    """REG's `SILoss`: loss.py as it is, or with the cosine REG-token target patched."""
    if path_type != "cosine":
        from loss import SILoss
        return SILoss
    text = (reg / "loss.py").read_text()
    assert text.count(COSINE_CLS_LINE) == 1, "REG's loss.py changed: check the cosine REG-token target"
    env = {"__name__": "loss_cosine_fixed"}
    exec(compile(text.replace(COSINE_CLS_LINE, COSINE_CLS_FIX), str(reg / "loss.py"), "exec"), env)
    return env["SILoss"]


class Trainer:
    """train.py's optimiser, EMA and loss around `model`, set up as its main does."""

    def __init__(self, reg, model, env, args, ema_decay):
        self.model, self.env, self.args, self.ema_decay = model, env, args, ema_decay
        self.ema = copy.deepcopy(model)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        env["update_ema"](self.ema, model, decay=0)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                           betas=(args.adam_beta1, args.adam_beta2),
                                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        self.loss_fn = reg_loss_class(reg, args.path_type)(prediction=args.prediction, path_type=args.path_type, encoders=[], accelerator=None,
                              latents_scale=torch.full((1, 4, 1, 1), LATENT_SCALE), latents_bias=torch.zeros(1, 4, 1, 1),
                              weighting=args.weighting)

    def step(self, x, feat, cls0, y, draws, time_input=None):
        """One iteration of train.py's loop on latents `x` (its REG token `cls0` is
        `feat[:, 0]`); `time_input` None lets REG draw the time. Returns what it made."""
        model, args = self.model, self.args
        labels_seen = []
        hook = model.y_embedder.embedding_table.register_forward_pre_hook(lambda _m, a: labels_seen.append(a[0].clone()))
        with draws:
            loss1, proj_loss1, time_input, noises, loss2 = self.loss_fn(model, x, dict(y=y), zs=[feat], cls_token=cls0,
                                                                        time_input=time_input, noises=None)
        hook.remove()
        loss = loss1.mean() + proj_loss1.mean() * args.proj_coeff + loss2.mean() * args.cls
        loss.backward()
        out = {"loss.x0": x, "loss.feat": feat, "loss.cls0": cls0, "loss.time": time_input.flatten(), "loss.noise": noises,
               "loss.y": labels_seen[0], "loss.denoise": loss1.detach(), "loss.cls": loss2.detach(),
               "loss.proj": proj_loss1.detach(), "loss.total": loss.detach()}
        out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        out["step.grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.env["update_ema"](self.ema, model, decay=self.ema_decay)
        out.update({f"step.param.{n}": p.detach().clone() for n, p in model.named_parameters()})
        out.update({f"step.ema.{n}": p.detach().clone() for n, p in self.ema.named_parameters()})
        return out


def prefix(step):
    """Keys of training step `step` (1-based): the first unprefixed, as in reg_tiny."""
    return "" if step == 1 else f"s{step}."


def make_case(reg, SiT, name, w, flags, ema_decay, seed):
    args, env = reg_settings(reg, flags)
    model = build(SiT, w, args, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.05, generator=g)
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    b, c, s, z, tokens = w["batch"], w["in_channels"], w["input_size"], w["z_dim"], model.x_embedder.num_patches + 1

    inp = {"in.x": torch.randn(b, c, s, s, generator=g), "in.t": torch.rand(b, generator=g),
           "in.y": torch.randint(0, args.num_classes + 1, (b,), generator=g), "in.cls": torch.randn(b, z, generator=g)}
    model.eval()
    with torch.no_grad():
        x, zs, cls = model(inp["in.x"], inp["in.t"], inp["in.y"], cls_token=inp["in.cls"])
    tensors.update({**inp, "out.x": x, "out.zs0": zs[0], "out.cls": cls})

    # Two iterations of train.py's loop: one Adam step from zero moments does not depend
    # on the betas (bias correction gives m = g, v = g^2); the second does.
    model.train()
    trainer = Trainer(reg, model, env, args, ema_decay)
    report = []
    for k in (1, 2):
        moments = torch.cat([torch.randn(b, c, s, s, generator=g) * 5.0, torch.rand(b, c, s, s, generator=g) + 0.1], 1)
        feat = torch.randn(b, tokens, z, generator=g)
        labels = torch.randint(0, args.num_classes, (b,), generator=g)
        with Draws() as d:
            x0 = env["sample_posterior"](moments, latents_scale=torch.full((1, 4, 1, 1), LATENT_SCALE),
                                         latents_bias=torch.zeros(1, 4, 1, 1))
        (_, eps), = d.log
        draws = Draws()
        out = trainer.step(x0, feat, feat[:, 0], labels, draws)
        kinds = [k for k, _ in draws.log]
        time_kind = "rand" if args.weighting == "uniform" else "randn"
        assert kinds == [time_kind, "randn_like", "randn_like", "rand"], f"{name}: REG's draws were {kinds}"
        (_, t_draw), (_, noise), (_, noise_cls), (_, drop) = draws.log
        assert torch.equal(noise, out["loss.noise"])
        out.update({"draw.moments": moments, "draw.eps": eps, "draw.time": t_draw.flatten(), "draw.labels": labels,
                    "draw.drop": drop, "loss.noise_cls": noise_cls})
        if k > 1:
            # Later steps' gradients show in their weights; kept out to keep the file small.
            out = {key: v for key, v in out.items() if not key.startswith("grad.")}
        tensors.update({prefix(k) + key: v for key, v in out.items()})
        report.append(f"{int((out['loss.y'] != labels).sum())} dropped, grad norm {float(out['step.grad_norm']):.3f}")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, DATA / f"{name}.safetensors")
    s = settings(model, w, args, ema_decay, flags)
    s.update(steps=2, reg_draws=True)
    json.dump(s, open(DATA / f"{name}.json", "w"), indent=1)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} weights, clip {args.max_grad_norm}; " + "; ".join(report))


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check_tiny(reg, SiT):
    """Replays reg_tiny's weights and inputs through REG's code; fails if an output is off."""
    g = load_file(DATA / "reg_tiny.safetensors")
    old = json.load(open(DATA / "reg_tiny.json"))
    w = dict(input_size=old["input_size"], patch_size=old["patch_size"], in_channels=old["in_channels"],
             hidden_size=old["hidden_size"], depth=old["depth"], num_heads=old["num_heads"], z_dim=old["z_dims"][0],
             projector_dim=old["projector_dim"], batch=old["batch"])
    # It was made with train.py's defaults: the replay reproducing its step confirms the
    # learning rate, epsilon and clip. Not the EMA decay: 0.9999 moves the EMA by about
    # 1e-8 in one step, under the 1e-6 the comparison resolves; it is train.py's value.
    flags = ["--num-classes", str(old["num_classes"]), "--encoder-depth", str(old["encoder_depth"])]
    args, env = reg_settings(reg, flags)
    model = build(SiT, w, args, 0)
    model.load_state_dict({n: g[n] for n in model.state_dict()}, strict=True)
    worst = {}

    def cmp(kind, key, got):
        assert got.shape == g[key].shape, key
        err = float((got.double() - g[key].double()).abs().max()) if kind == "step_abs" else rel(got, g[key])
        worst[kind] = max(worst.get(kind, 0.0), err)
        assert err <= TOL[kind], f"reg_tiny {key}: {err:e} > {TOL[kind]:e}"

    cmp("pos_embed", "pos_embed", model.pos_embed.detach())
    model.eval()
    with torch.no_grad():
        x, zs, cls = model(g["in.x"], g["in.t"], g["in.y"], cls_token=g["in.cls"])
    for k, v in [("out.x", x), ("out.zs0", zs[0]), ("out.cls", cls)]:
        cmp("out", k, v)
    # Its loss took in.y without dropout (eval mode), its own time, noise and REG token.
    draws = Draws(replay=[g["loss.noise"], g["loss.noise_cls"]])
    out = Trainer(reg, model, env, args, 0.9999).step(g["loss.x0"], g["loss.feat"], g["loss.cls0"], g["in.y"], draws,
                                                 time_input=g["loss.time"].view(-1, 1, 1, 1))
    assert not draws.replay, "REG drew less than the file holds"
    for k in ["loss.denoise", "loss.cls", "loss.proj", "loss.total"]:
        cmp("loss", k, out[k])
    grads = [k for k in out if k.startswith("grad.")]
    assert sorted(grads) == sorted(k for k in g if k.startswith("grad.")), "the same parameters have gradients"
    for k in grads:
        cmp("grad", k, out[k])
    cmp("grad_norm", "step.grad_norm", out["step.grad_norm"])
    steps = [k for k in out if k.startswith("step.") and k != "step.grad_norm"]
    assert sorted(steps) == sorted(k for k in g if k.startswith("step.") and k != "step.grad_norm")
    for k in steps:
        cmp("step_abs", k, out[k])
    print("reg_tiny replayed through REG: max errors " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    s = settings(model, w, args, 0.9999, flags)
    s.update(steps=1, reg_draws=False)
    for k, v in s.items():
        assert old.get(k, v) == v, f"reg_tiny.json {k}: {old[k]} but REG's settings give {v}"
    json.dump({**old, **s}, open(DATA / "reg_tiny.json", "w"), indent=1)


def main() -> None:
    reg = pathlib.Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(reg))
    from models.sit import SiT
    for name, (w, flags, ema_decay, seed) in CASES.items():
        make_case(reg, SiT, name, w, flags, ema_decay, seed)
    check_tiny(reg, SiT)


if __name__ == "__main__":
    main()
