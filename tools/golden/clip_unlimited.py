"""A CLIP text folder whose tokenizer transformers saved without a length limit (checked by
tests/clip.rs `a_tokenizer_without_a_limit_takes_the_text_towers_positions`).

transformers writes `"model_max_length": 1000000000000000019884624838656` (its stand-in for
"no limit", int(1e30)) when a tokenizer is made without one. Writes, with `save_pretrained`:

  tests/data/clip_unlimited/   tokenizer.json, tokenizer_config.json (that number),
                               config.json of a `CLIPTextConfig` with 16 positions
  tests/data/clip_unlimited/expected.json: {"max_length": 16, "cases": [{"text", "padded"}]}:
    `padded` = tokenizer(text, padding="max_length", truncation=True,
                         max_length=config.max_position_embeddings)["input_ids"]

Run in a virtualenv with transformers (no torch needed):
  python tools/golden/clip_unlimited.py
"""

import json
import pathlib

import transformers
from transformers import CLIPTextConfig, CLIPTokenizer

repo = pathlib.Path(__file__).resolve().parents[2]
src = repo / "tests/data/clip_tiny"
out = repo / "tests/data/clip_unlimited"
out.mkdir(exist_ok=True)

# The vocabulary and merges of the tiny CLIP folder, with no length given.
raw = out / "raw"
raw.mkdir(exist_ok=True)
for f in ["vocab.json", "merges.txt"]:
    (raw / f).write_bytes((src / f).read_bytes())
tok = CLIPTokenizer.from_pretrained(raw)
for f in ["vocab.json", "merges.txt"]:
    (raw / f).unlink()
raw.rmdir()
assert tok.model_max_length > 1 << 60, tok.model_max_length
tok.save_pretrained(out)
saved = json.loads((out / "tokenizer_config.json").read_text())
assert saved["model_max_length"] > 1 << 60, saved

config = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
config.save_pretrained(out)

n = config.max_position_embeddings
texts = ["a photo of a cat", "", "a large white disc in the upper left", "a " * 30]
cases = [{"text": t, "padded": tok(t, padding="max_length", truncation=True, max_length=n)["input_ids"]} for t in texts]
(out / "expected.json").write_text(json.dumps({"transformers": transformers.__version__, "max_length": n, "cases": cases}, indent=1))
print("wrote", out)
