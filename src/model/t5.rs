//! The caption encoder of LlamaGen's text-to-image models: FLAN-T5's encoder
//! (candle-transformers' T5) and its tokenizer (the `tokenizers` crate), loaded from a
//! Hugging Face folder with `config.json`, `tokenizer.json` and `model.safetensors` (or the
//! sharded `model.safetensors.index.json`).
//!
//! LlamaGen (language/t5.py) cleans the caption, tokenises it to at most 120 tokens with
//! `</s>` at the end, pads it to 120 on the right and runs the encoder with the padding
//! masked. candle's encoder takes no attention mask, so this runs it on the caption's own
//! tokens only: with the padding masked, a real token never attends to a pad, and T5's
//! relative position bias depends on distances alone, so the rows are the same. The pad rows
//! are zeroed by the sampler anyway. The GPT places the rows (left padding) and masks the rest:
//! see `Gpt::start`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5::{self, T5EncoderModel};
use tokenizers::{Tokenizer, TruncationParams};

use crate::model::Condition;
use crate::weights::{self, WeightsError};

/// FLAN-T5's encoder and tokenizer.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    model: T5EncoderModel,
    /// Width of a row of the output (2048 for FLAN-T5-XL).
    pub dim: usize,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// The last caption encoded and its condition (runs of one prompt reuse it).
    last: Option<(String, Condition)>,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("dir", &self.dir)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

/// The weight file of a Hugging Face folder: the shard index when there is one, else
/// `model.safetensors`.
pub fn weight_file(dir: &Path) -> PathBuf {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        index
    } else {
        dir.join("model.safetensors")
    }
}

/// Whether a tensor of a T5 checkpoint belongs to the encoder (the rest is the decoder's).
pub fn is_encoder_tensor(name: &str) -> bool {
    name.starts_with("shared.") || name.starts_with("encoder.")
}

/// The encoder's parameter count in the folder `dir`, from the weight headers alone.
pub fn encoder_params(dir: &Path) -> Result<u64, WeightsError> {
    weights::count_elements_where(&weight_file(dir), &is_encoder_tensor)
}

/// The encoder's compute type: f32 on the CPU and on Metal (T5 overflows in f16), bf16 on
/// CUDA as LlamaGen runs it.
fn dtype(device: &Device) -> DType {
    match device {
        Device::Cuda(_) => DType::BF16,
        _ => DType::F32,
    }
}

impl TextEncoder {
    /// Loads the folder `dir`; captions are cut to `max_tokens` tokens (`</s>` included).
    pub fn load(dir: &Path, max_tokens: usize, device: &Device) -> Result<Self, WeightsError> {
        Self::load_with(dir, max_tokens, device, &mut |_| {})
    }

    /// [`TextEncoder::load`], telling `on_file` of each weight file before it is read.
    pub fn load_with(
        dir: &Path,
        max_tokens: usize,
        device: &Device,
        on_file: weights::OnFile,
    ) -> Result<Self, WeightsError> {
        let config_path = dir.join("config.json");
        let bad = |path: &Path, msg: String| WeightsError::BadManifest {
            path: path.to_path_buf(),
            msg,
        };
        if !config_path.is_file() {
            return Err(WeightsError::MissingFile(config_path));
        }
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| bad(&config_path, e.to_string()))?;
        let cfg: t5::Config = serde_json::from_str(&text)
            .map_err(|e| bad(&config_path, format!("not a T5 config: {e}")))?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(WeightsError::MissingFile(tok_path));
        }
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| WeightsError::Corrupt {
            path: tok_path.clone(),
            msg: format!("not a tokenizer: {e}"),
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| bad(&tok_path, format!("cannot truncate to {max_tokens}: {e}")))?;
        let path = weight_file(dir);
        // The encoder's half of the checkpoint only (FLAN-T5's files hold the decoder too).
        let keep = is_encoder_tensor;
        let vb = weights::var_builder_where(&path, Some(&keep), dtype(device), device, on_file)?;
        let model = T5EncoderModel::load(vb, &cfg).map_err(|e| weights::mismatch(&path, e))?;
        Ok(Self {
            tokenizer,
            model,
            dim: cfg.d_model,
            dir: dir.to_path_buf(),
            last: None,
        })
    }

    /// The token ids of `caption` after LlamaGen's cleaning ([`clean_caption`]), `</s>`
    /// included, cut to the maximum length.
    pub fn tokens(&self, caption: &str) -> anyhow::Result<Vec<u32>> {
        let text = clean_caption(caption);
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("cannot tokenise the caption: {e}"))?;
        let ids = enc.get_ids().to_vec();
        anyhow::ensure!(!ids.is_empty(), "the caption gives no tokens");
        Ok(ids)
    }

    /// The encoder's rows for `caption`: a [`Condition::Caption`] with one row per token.
    pub fn encode(&mut self, caption: &str) -> anyhow::Result<Condition> {
        if let Some((c, cond)) = &self.last
            && c == caption
        {
            return Ok(cond.clone());
        }
        let ids = self.tokens(caption)?;
        let n = ids.len();
        let device = self.model.device().clone();
        let input = Tensor::from_vec(ids, (1, n), &device)?;
        let out = device
            .with_context(|| self.model.forward(&input))
            .context("the text encoder failed")?;
        self.model.clear_kv_cache();
        let values = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(
            values.iter().all(|v| v.is_finite()),
            "the text encoder produced NaN or infinite values: its weights are out of range"
        );
        let cond = Condition::Caption { len: n, values };
        self.last = Some((caption.to_string(), cond.clone()));
        Ok(cond)
    }
}

/// LlamaGen's caption cleaning (`T5Embedder.clean_caption`, applied twice), for the rules
/// that change ordinary prompts: `+` and `%XX` decoded as in a URL query, lower case, every
/// dash to `-`, curly quotes to straight ones, runs of `#®•©™&@·º½¾¿¡§~()[]{}|\/*` to a space,
/// `-` and `_` to spaces when there are more than three, a space after `,` `.` `/` that
/// follows a non-digit and precedes a word, whitespace collapsed, and a leading `'_,-:;` or
/// trailing `'_,-:+` dropped. Its URL, HTML, @handle, CJK, file-name and product-code removals
/// are not reproduced: they matter for scraped captions, not typed ones.
pub fn clean_caption(caption: &str) -> String {
    let once = |s: &str| -> String {
        let s = unquote_plus(s).trim().to_lowercase();
        let dashes = [
            '\u{2D}', '\u{58A}', '\u{5BE}', '\u{1400}', '\u{1806}', '\u{2E17}', '\u{2E1A}',
            '\u{2E3A}', '\u{2E3B}', '\u{2E40}', '\u{301C}', '\u{3030}', '\u{30A0}', '\u{FE31}',
            '\u{FE32}', '\u{FE58}', '\u{FE63}', '\u{FF0D}',
        ];
        let is_dash = |c: char| dashes.contains(&c) || ('\u{2010}'..='\u{2015}').contains(&c);
        let bad_punct = "#®•©™&@·º½¾¿¡§~)(][}{|\\/*";
        let mut out = String::with_capacity(s.len());
        let mut prev_dash = false;
        let mut prev_bad = false;
        for c in s.chars() {
            if is_dash(c) {
                if !prev_dash {
                    out.push('-');
                }
                prev_dash = true;
                prev_bad = false;
                continue;
            }
            prev_dash = false;
            if bad_punct.contains(c) {
                if !prev_bad {
                    out.push(' ');
                }
                prev_bad = true;
                continue;
            }
            prev_bad = false;
            out.push(match c {
                '`' | '´' | '«' | '»' | '“' | '”' | '¨' => '"',
                '‘' | '’' => '\'',
                c => c,
            });
        }
        // Runs of quotes become one `"`, runs of dots a space, a lone ` . ` a space.
        let mut runs = String::with_capacity(out.len());
        let chars: Vec<char> = out.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let run = chars[i..]
                .iter()
                .take_while(|&&x| x == c || (c == '"' || c == '\'') && (x == '"' || x == '\''))
                .count();
            match c {
                '"' | '\'' if run >= 2 => runs.push('"'),
                '.' if run >= 2 => runs.push(' '),
                _ => runs.extend(&chars[i..i + run]),
            }
            i += run;
        }
        let mut out = runs.replace(" . ", " ");
        if out.chars().filter(|&c| c == '-' || c == '_').count() > 3 {
            out = out.replace(['-', '_'], " ");
        }
        // A space after `,` `.` `/` that follows a non-digit and starts a word.
        let chars: Vec<char> = out.chars().collect();
        let mut spaced = String::with_capacity(out.len() + 8);
        for (i, &c) in chars.iter().enumerate() {
            spaced.push(c);
            let word = |x: char| x.is_alphanumeric() || x == '_';
            if matches!(c, ',' | '.' | '/')
                && i > 0
                && !chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(|&n| word(n))
            {
                spaced.push(' ');
            }
        }
        let mut s = spaced.split_whitespace().collect::<Vec<_>>().join(" ");
        let quote = |c: char| c == '"' || c == '\'';
        if s.chars().count() >= 2 && s.starts_with(quote) && s.ends_with(quote) {
            s = s[1..s.len() - 1].to_string();
        }
        if s.starts_with(['\'', '_', ',', '-', ':', ';']) {
            s.remove(0);
        }
        if s.ends_with(['\'', '_', ',', '-', ':', '+']) {
            s.pop();
        }
        s.trim().to_string()
    };
    once(&once(caption))
}

/// `urllib.parse.unquote_plus`: `+` is a space, `%XX` a byte; bytes that do not form UTF-8
/// become U+FFFD.
fn unquote_plus(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            x => out.push(x),
        }
        i += 1;
    }
    // Bytes that are not UTF-8 become U+FFFD, as Python's `errors="replace"` does.
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_follows_llamagen_for_typed_prompts() {
        let cases = [
            (
                "  A Red Apple on a wooden   table ",
                "a red apple on a wooden table",
            ),
            ("cat+dog", "cat dog"),
            ("50%25 off", "50% off"),
            ("“quoted” — dash", "\"quoted\" - dash"),
            ("a (big) cat*** here", "a big cat here"),
            ("apple,table.sky", "apple, table. sky"),
            ("1,5 apples", "1,5 apples"),
            ("this-is-my-cute-cat", "this is my cute cat"),
            ("well-known cat", "well-known cat"),
            ("- a cat:", "a cat"),
            ("%zz and %", "%zz and %"),
            ("a+b%FF", "a b\u{FFFD}"),
            ("", ""),
            ("\"a cat\"", "a cat"),
            ("wait... ''what''", "wait \"what\""),
        ];
        for (typed, cleaned) in cases {
            assert_eq!(clean_caption(typed), cleaned, "{typed:?}");
        }
    }
}
