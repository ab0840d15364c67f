//! CLIP's byte-level BPE tokenizer from a model folder, through the `tokenizers` crate, with CLIP's 77-token truncation and padding.

use crate::bail_input;
use crate::encoders::clip::ClipConfig;
use crate::error::bad_input;
use anyhow::Result;
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer, TruncationParams};

/// CLIP's context: every published CLIP text tower has 77 positions.
pub const CLIP_MAX_LENGTH: usize = 77;
/// A `model_max_length` above this means "no limit" (no text tower has 2^20 positions).
const NO_LIMIT: u64 = 1 << 20;
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// The split before byte-level BPE, as transformers' `CLIPTokenizer` sets it: special tokens,
/// English contractions, runs of letters, single digits, runs of other non-space characters.
const PRE_TOKENIZER_REGEX: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The tokenizer of a CLIP folder: `tokenizer.json` when there is one, else `vocab.json` +
/// `merges.txt` assembled the way transformers' `CLIPTokenizer` assembles them (NFC, runs of
/// whitespace to one space, lowercase; the split above; byte-level BPE with `</w>` ending
/// words; `<|startoftext|> ... <|endoftext|>` around).
pub struct ClipTokenizer {
    /// Truncates to `max_length` (special tokens included) and pads to it.
    padded: Tokenizer,
    /// The same without truncation or padding.
    plain: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

fn tokenizer_error(file: &str, e: impl std::fmt::Display) -> anyhow::Error {
    bad_input(format!("{file}: not a tokenizer this program reads: {}", crate::error::first_line(e)))
}

/// The content of a special-token field of `tokenizer_config.json`: a string, or an
/// object with `content` (transformers writes either).
fn token_field(cfg: &serde_json::Map<String, Value>, name: &str, file: &str) -> Result<Option<String>> {
    match cfg.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => match v.get("content").and_then(Value::as_str) {
            Some(s) => Ok(Some(s.to_string())),
            None => bail_input!("{file}: field {name}: expected a string or an object with \"content\", found {v}"),
        },
    }
}

/// The positions of the text tower beside a tokenizer (`config.json`'s
/// `max_position_embeddings`), or CLIP's 77 for a folder with the tokenizer alone.
fn text_positions(dir: &Path) -> Result<usize> {
    let cfg_path = dir.join("config.json");
    let text = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CLIP_MAX_LENGTH),
        Err(e) => bail_input!("{}: cannot read: {e}", cfg_path.display()),
    };
    let config = ClipConfig::parse(&text, &cfg_path.display().to_string())?;
    Ok(config.text.map_or(CLIP_MAX_LENGTH, |t| t.max_position_embeddings as usize))
}

impl ClipTokenizer {
    /// Reads the tokenizer of `dir`. `tokenizer_config.json`, when present, gives the pad token
    /// (openai's pads with `<|endoftext|>`, open_clip-derived ones with `!`) and
    /// `model_max_length`; without it, `<|endoftext|>`, and without a length (or with
    /// transformers' "no limit") the text tower's positions.
    pub fn load(dir: &Path) -> Result<ClipTokenizer> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_file = cfg_path.display().to_string();
        let cfg = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => bail_input!("{cfg_file}: expected a JSON object"),
                Err(e) => bail_input!("{cfg_file}: not valid JSON: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(e) => bail_input!("{cfg_file}: cannot read: {e}"),
        };
        let pad_token = token_field(&cfg, "pad_token", &cfg_file)?.unwrap_or_else(|| EOS.to_string());
        // A tokenizer saved without a limit has no `model_max_length`, or transformers'
        // stand-in for "none", int(1e30), which JSON readers see as a float: the length is
        // then the text tower's `max_position_embeddings`.
        let max_length = match cfg.get("model_max_length") {
            None => None,
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(n), _) if (2..=NO_LIMIT).contains(&n) => Some(n as usize),
                (_, Some(x)) if x > NO_LIMIT as f64 => None,
                _ => bail_input!("{cfg_file}: field model_max_length: expected an integer of at least 2, found {v}"),
            },
        };
        let max_length = match max_length {
            Some(n) => n,
            None => text_positions(dir)?,
        };

        let json = dir.join("tokenizer.json");
        let (plain, source) = if json.exists() {
            let file = json.display().to_string();
            (Tokenizer::from_file(&json).map_err(|e| tokenizer_error(&file, e))?, file)
        } else {
            Self::from_vocab_merges(dir)?
        };
        let pad_id = match plain.token_to_id(&pad_token) {
            Some(id) => id,
            None => bail_input!("{cfg_file}: field pad_token: {pad_token:?} is not in the vocabulary of {source}"),
        };
        for t in [BOS, EOS] {
            if plain.token_to_id(t).is_none() {
                bail_input!("{source}: {t} is not in the vocabulary (not a CLIP tokenizer)");
            }
        }
        let mut plain = plain;
        plain.with_truncation(None).map_err(|e| tokenizer_error(&source, e))?;
        plain.with_padding(None);
        let mut padded = plain.clone();
        // transformers' truncation=True with max_length: the text is cut so that it fits
        // with the special tokens the post-processor adds; padding after them.
        padded.with_truncation(Some(TruncationParams { max_length, ..Default::default() })).map_err(|e| tokenizer_error(&source, e))?;
        padded.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(ClipTokenizer { padded, plain, max_length, pad_id })
    }

    /// `vocab.json` + `merges.txt` as transformers' `CLIPTokenizer.__init__` builds them.
    fn from_vocab_merges(dir: &Path) -> Result<(Tokenizer, String)> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let source = vocab.display().to_string();
        for f in [&vocab, &merges] {
            if !f.exists() {
                bail_input!("{}: missing (a CLIP tokenizer needs tokenizer.json, or vocab.json and merges.txt)", f.display());
            }
        }
        let both = format!("{} + merges.txt", source);
        let bpe = BPE::from_file(&vocab.display().to_string(), &merges.display().to_string())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(EOS.to_string())
            .build()
            .map_err(|e| tokenizer_error(&both, e))?;
        let mut tk = Tokenizer::new(bpe);
        let ws = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ").map_err(|e| tokenizer_error(&both, e))?;
        tk.with_normalizer(Some(NormSeq::new(vec![NFC.into(), ws.into(), Lowercase.into()])));
        let split = Split::new(SplitPattern::Regex(PRE_TOKENIZER_REGEX.to_string()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tokenizer_error(&both, e))?;
        tk.with_pre_tokenizer(Some(PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        let id =
            |t: &str| tk.token_to_id(t).ok_or_else(|| bad_input(format!("{source}: {t} is not in the vocabulary (not a CLIP tokenizer)")));
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        tk.with_post_processor(Some(
            RobertaProcessing::new((EOS.to_string(), eos), (BOS.to_string(), bos)).trim_offsets(false).add_prefix_space(false),
        ));
        tk.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        Ok((tk, both))
    }

    /// The length every padded sequence has (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id padding uses (from `tokenizer_config.json`'s `pad_token`).
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// `<|startoftext|> text <|endoftext|>` as ids, neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.plain.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// As `encode`, cut to `max_length` (the end token kept) and padded to it.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.padded.encode(text, true).map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Captions -> [B, max_length] int64 on the CPU, the text tower's input.
    pub fn batch(&self, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        for t in texts {
            ids.extend(self.encode_padded(t)?);
        }
        Ok(Tensor::from_slice(&ids).to_kind(Kind::Int64).reshape([texts.len() as i64, self.max_length as i64]))
    }
}
