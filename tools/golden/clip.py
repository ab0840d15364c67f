"""Golden outputs for src/encoders/clip.rs (checked by tests/clip.rs).

Builds a tiny random transformers `CLIPModel` (text: hidden 32, 2 layers, 4 heads, quick_gelu;
vision: hidden 48, 2 layers, 4 heads, plain gelu, 32 px images in 8 px patches; projections to
24) and a tokenizer made from CLIP's real BPE (the first NUM_MERGES merges of the
`bpe_simple_vocab_16e6.txt.gz` that the open_clip_torch wheel ships, with its vocabulary built
the way CLIP builds it: 256 byte symbols, the same with `</w>`, one entry per merge, then
<|startoftext|> and <|endoftext|>). Writes, with `save_pretrained` (published naming):

  tests/data/clip_tiny/            config.json, model.safetensors, tokenizer.json,
                                   tokenizer_config.json (what transformers writes), and the
                                   vocab.json + merges.txt the tokenizer was made from
  tests/data/clip_tiny_golden.safetensors
    in.input_ids          i64 [4, 77]   rows 0-1: ids from the tokenizer (padded with <|endoftext|>);
                                        row 2: random ids with <|endoftext|> at 40 and random ids after
                                        it; row 3: random ids without any <|endoftext|> (there the
                                        two pooling rules disagree: position 0 vs the largest id)
    in.pixel_values       f32 [3, 3, 32, 32]  already preprocessed (what CLIPImageProcessor outputs)
    out.text_last_hidden  f32 [4, 77, 32]  text_model last_hidden_state (after final_layer_norm)
    out.text_pooled       f32 [4, 32]      pooler_output, eos_token_id from the config (first <|endoftext|>)
    out.text_pooled_legacy f32 [4, 32]     pooler_output with text_config.eos_token_id = 2 (argmax of ids)
    out.text_embeds       f32 [4, 24]      text_projection(pooled)
    out.vision_last_hidden f32 [3, 17, 48] vision_model last_hidden_state
    out.vision_pooled     f32 [3, 48]      post_layernorm(CLS)
    out.image_embeds      f32 [3, 24]      visual_projection(pooled)
  metadata: `text_model.config` = the config.json transformers writes for a `CLIPTextModel` with
  the same text config (its state dict keys are checked here to be the `text_model.*` keys of
  the CLIPModel less that prefix), so the test can build text-only folders from the same weights.

  tests/data/clip_tiny_tokens.json: {"max_length": 77, "cases": [{"text", "ids", "padded"}]}:
    `ids` = tokenizer(text)["input_ids"] (with <|startoftext|> ... <|endoftext|>, no truncation)
    `padded` = tokenizer(text, padding="max_length", truncation=True, max_length=77)["input_ids"]
  for a few hundred varied strings (punctuation, accents, other scripts, emoji, digits, runs of
  whitespace, contractions, literal special tokens, captions longer than 77 tokens, empty).
  In transformers 5 `CLIPTokenizer` and `CLIPTokenizerFast` are one class (backed by the
  `tokenizers` library); both names are loaded and checked to agree.

The model is run in float64 and the outputs stored as float32, so the golden is the exact
answer rounded once.

Set-up, in a separate virtualenv (never the project's .venv): reuse the torch of
/tmp/goldvenv (see tools/golden/dinov2.py) and add transformers, tokenizers and open_clip's
vocabulary file without touching torch:

    /tmp/goldvenv/bin/python -m venv /tmp/clipvenv
    echo /tmp/goldvenv/lib/python3.11/site-packages > /tmp/clipvenv/lib/python3.11/site-packages/goldvenv.pth
    /tmp/clipvenv/bin/pip install --no-deps transformers==5.24.0 tokenizers==0.23.3 open_clip_torch==3.3.0 typer==0.29.2
    (typer pulls annotated-doc, rich, markdown-it-py, mdurl, shellingham: `pip install typer==0.29.2`)

Run from the repository root:

    /tmp/clipvenv/bin/python tools/golden/clip.py
"""

import gzip
import json
import os
import random
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

OUT_DIR = "tests/data/clip_tiny"
GOLDEN = "tests/data/clip_tiny_golden.safetensors"
TOKENS = "tests/data/clip_tiny_tokens.json"
NUM_MERGES = 1500
MAX_LEN = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab(folder: str) -> None:
    """vocab.json + merges.txt from the head of CLIP's real merge list, as CLIP's SimpleTokenizer
    builds its vocabulary (its merges file starts with a version line, skipped as CLIP does)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open_clip_torch is not installed"
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(l.split()) for l in lines[1 : 1 + NUM_MERGES]]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_strings(rng: random.Random) -> list[str]:
    fixed = [
        "",
        " ",
        "a photo of a cat",
        "A Photo Of A CAT!!!",
        "a   photo\tof\n\na  cat  ",
        "  leading and trailing   ",
        "it's don't we're they've I'm you'll he'd",
        "IT'S DON'T",
        "rock'n'roll o'clock ''quoted'' 'single'",
        "numbers: 0 1 2 12 123 2024 3.14159 1,000,000 -42 +7 1e-5",
        "punctuation!?... ,;:()[]{}<>/\\|@#$%^&*_-+=~`\"",
        "café naïve résumé über straße façade jalapeño",
        "CAFÉ NAÏVE ÜBER",
        "cafe\u0301 nai\u0308ve (combining accents, NFC composes them)",
        "Ω ω Σσς İstanbul ǅ ﬁ ligature",
        "日本語のテキスト 中文文本 한국어 텍스트",
        "Привет мир, Ελληνικά, עברית, العربية, हिन्दी",
        "emoji 🐱🐶 🚀 👍🏽 👨‍👩‍👧 ❤️ ☕",
        "tabs\tand\u00a0non-breaking\u2003em space\u3000ideographic",
        "zero\u200bwidth\u200djoiner",
        "<|startoftext|>",
        "<|endoftext|>",
        "text with <|endoftext|> inside and <|startoftext|> too",
        "a<|endoftext|>b",
        "hello world hello world",
        "x" * 200,
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "e-mail: someone@example.com, url: https://example.org/path?q=1&r=2#frag",
        "$100 €50 £20 ¥1000 ₹500 50% 3/4 ½ ²",
        "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
        "\u0000control\u0007chars\u001b[0m",
        "mixed123numbers456and789letters",
        "....!!!???",
        "a" + " a" * 100,
        " ".join(["a red cube on top of a blue sphere next to a green cylinder"] * 6),
    ]
    words = (
        "a the of photo cat dog red blue green small large cube sphere on top next to in front behind "
        "painting sunset over mountains city street at night man woman child riding bicycle horse "
        "bowl fruit table wooden glass reflection snow forest river boat sky clouds portrait"
    ).split()
    extras = [
        "!", "?", ",", ".", "...", "'s", "'t", "'ll", "'re", "(", ")", "\"", "-", "/", "&", "#1", "42",
        "2.5", "é", "ñ", "ü", "Ä", "東京", "猫", "🐱", "🌅", "✨", "\t", "  ", "\n", "ß", "İ", "Æ", "œ",
    ]
    out = list(fixed)
    while len(out) < 320:
        n = rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 90])
        parts = []
        for _ in range(n):
            w = rng.choice(words) if rng.random() < 0.75 else rng.choice(extras)
            if rng.random() < 0.15:
                w = w.upper()
            elif rng.random() < 0.15:
                w = w.capitalize()
            parts.append(w)
        sep = rng.choice([" ", " ", " ", "", "  ", "\t"])
        out.append(sep.join(parts))
    return out


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights large enough that every part matters (HF's init leaves LayerNorms at 1/0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name == "logit_scale":
                p.fill_(2.6592)
            elif ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "embedding" in name:
                p.copy_(r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


def main() -> None:
    rng = random.Random(20240611)
    gen = torch.Generator().manual_seed(20240611)
    os.makedirs(OUT_DIR, exist_ok=True)
    for f in os.listdir(OUT_DIR):
        os.remove(os.path.join(OUT_DIR, f))

    # The tokenizer, from vocab.json + merges.txt, saved in transformers' own format.
    # vocab.json + merges.txt stay in the folder too (as in openai's; Stable Diffusion's
    # tokenizer folders have only these), so both ways of loading are checked.
    with tempfile.TemporaryDirectory() as raw:
        write_vocab(raw)
        from_files = CLIPTokenizer.from_pretrained(raw, model_max_length=MAX_LEN)
        from_files.save_pretrained(OUT_DIR)
        write_vocab(OUT_DIR)
    tok = CLIPTokenizer.from_pretrained(OUT_DIR)
    fast = CLIPTokenizerFast.from_pretrained(OUT_DIR)
    vocab_size = len(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos) == (vocab_size - 2, vocab_size - 1), (bos, eos, vocab_size)
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == MAX_LEN

    cases = []
    for text in test_strings(rng):
        ids = tok(text)["input_ids"]
        padded = tok(text, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]
        assert fast(text)["input_ids"] == ids and from_files(text)["input_ids"] == ids
        assert fast(text, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"] == padded
        assert len(padded) == MAX_LEN
        cases.append({"text": text, "ids": ids, "padded": padded})
    assert any(len(c["ids"]) > MAX_LEN for c in cases), "no caption longer than 77 tokens"
    with open(TOKENS, "w", encoding="utf-8") as f:
        f.write('{"max_length": %d, "cases": [\n' % MAX_LEN)
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")

    # The model.
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LEN,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=24,
    )
    model = CLIPModel._from_config(config, attn_implementation="eager").eval()
    randomise(model, gen)
    model.save_pretrained(OUT_DIR)
    with safe_open(os.path.join(OUT_DIR, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys, sorted(keys)
    assert "vision_model.pre_layrnorm.weight" in keys, sorted(keys)

    # A CLIPTextModel of the same text config: its published keys are the text_model.* ones.
    text_only = CLIPTextModel._from_config(config.text_config, attn_implementation="eager")
    with tempfile.TemporaryDirectory() as d:
        text_only.save_pretrained(d)
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            text_keys = set(f.keys())
        with open(os.path.join(d, "config.json")) as f:
            text_config_json = f.read()
    # transformers 5 writes a CLIPTextModel without the `text_model.` prefix that published
    # text encoders (and CLIPModel) carry; the loader must take both.
    assert text_keys == {k.removeprefix("text_model.") for k in keys if k.startswith("text_model.")}, sorted(text_keys)
    assert json.loads(text_config_json)["model_type"] == "clip_text_model"

    # Inputs.
    captions = ["a photo of a cat", "A red cube on top of a blue sphere, next to 3 green cylinders!"]
    ids = tok(captions, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")["input_ids"]
    row2 = torch.randint(0, eos - 1, (MAX_LEN,), generator=gen)
    row2[0] = bos
    row2[40] = eos
    row3 = torch.randint(0, eos - 1, (MAX_LEN,), generator=gen)
    input_ids = torch.cat([ids, row2[None], row3[None]]).to(torch.int64)
    pixel_values = torch.randn(3, 3, 32, 32, generator=gen)

    model = model.double()
    with torch.no_grad():
        t = model.text_model(input_ids=input_ids)
        v = model.vision_model(pixel_values=pixel_values.double())
        text_embeds = model.text_projection(t.pooler_output)
        image_embeds = model.visual_projection(v.pooler_output)
        # Cross-check the projections against CLIPModel's own feature functions.
        assert torch.allclose(model.get_text_features(input_ids=input_ids).pooler_output, text_embeds)
        assert torch.allclose(model.get_image_features(pixel_values=pixel_values.double()).pooler_output, image_embeds)
        model.text_model.eos_token_id = 2
        legacy = model.text_model(input_ids=input_ids).pooler_output
    first_eos = (input_ids == eos).int().argmax(-1)
    assert first_eos.tolist()[2:] == [40, 0]
    assert not torch.allclose(legacy[3], t.pooler_output[3]), "row 3 should pool differently"

    out = {
        "in.input_ids": input_ids,
        "in.pixel_values": pixel_values.float(),
        "out.text_last_hidden": t.last_hidden_state.float(),
        "out.text_pooled": t.pooler_output.float(),
        "out.text_pooled_legacy": legacy.float(),
        "out.text_embeds": text_embeds.float(),
        "out.vision_last_hidden": v.last_hidden_state.float(),
        "out.vision_pooled": v.pooler_output.float(),
        "out.image_embeds": image_embeds.float(),
    }
    save_file({k: v.contiguous() for k, v in out.items()}, GOLDEN, metadata={"text_model.config": text_config_json})
    total = sum(os.path.getsize(os.path.join(OUT_DIR, f)) for f in os.listdir(OUT_DIR))
    total += os.path.getsize(GOLDEN) + os.path.getsize(TOKENS)
    print(f"wrote {OUT_DIR} ({sorted(os.listdir(OUT_DIR))}), {GOLDEN}, {TOKENS} ({len(cases)} strings): {total} bytes")
    print("pooled rows (first eos / argmax):", first_eos.tolist(), input_ids.argmax(-1).tolist())
    assert total < 1_000_000, total


if __name__ == "__main__":
    sys.exit(main())
