//! Passkey retrieval at long context: a 5-digit key hidden at a given depth of a haystack of
//! real text, asked for at the end, answered greedily and checked exactly. What users of long
//! caches complain about first (retrieval breaking past tens of thousands of tokens) measured
//! per cache configuration, beside KLD.
//!
//! The prompt is assembled from tokens, not re-tokenized text, so its length is exact: BOS (where
//! the model's texts start with one), an instruction, the haystack (the text's tokens repeated
//! as needed) with the needle inserted at `depth` of it, and the question. Keys come from a seed
//! and the case, so every configuration answers the same prompts.

use serde::Serialize;

use crate::llama::{Context, ContextParams, CreateContextError, DecodeError, Model, Token, TokenizeError};

pub const INTRO: &str = "There is an important piece of information hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about it.\n\n";
pub const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";
/// Tokens generated for the answer (a 5-digit key takes 1-5 tokens after a space).
const ANSWER_TOKENS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    #[error("tokenizing the haystack")]
    Tokenize(#[from] TokenizeError),
    #[error("a context of {n_ctx} tokens for passkey retrieval")]
    Context { n_ctx: u32, source: CreateContextError },
    #[error("decoding the passkey prompt of {n_ctx} tokens")]
    Decode { n_ctx: u32, source: DecodeError },
    #[error("context {0} leaves no room for a haystack")]
    TooShort(u32),
    #[error("the haystack text has no tokens")]
    EmptyHaystack,
}

/// One retrieval: a context length, where the needle sits (0 = start of the haystack, 1 = end)
/// and the key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    pub n_ctx: u32,
    pub depth: f64,
    pub key: u32,
}

/// A case answered under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub config: String,
    #[serde(flatten)]
    pub case: Case,
    /// The model's greedy continuation.
    pub answer: String,
    pub correct: bool,
    /// Seconds for the prompt and the answer.
    pub seconds: f64,
}

/// The cases of every context × depth, each with its own key (from `seed`).
pub fn cases(contexts: &[u32], depths: &[f64], seed: u64) -> Vec<Case> {
    let mut out = Vec::new();
    for &n_ctx in contexts {
        for &depth in depths {
            let mut x = seed ^ (u64::from(n_ctx) << 20) ^ (depth * 1e6) as u64;
            // splitmix64: a different 5-digit key per case, the same for every configuration
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            out.push(Case { n_ctx, depth: depth.clamp(0.0, 1.0), key: 10_000 + (x % 90_000) as u32 });
        }
    }
    out
}

/// Tokens of the case's prompt: at most `n_ctx − 8` (room for the answer).
pub fn prompt(model: &Model, haystack: &[Token], case: &Case) -> Result<Vec<Token>, PasskeyError> {
    if haystack.is_empty() {
        return Err(PasskeyError::EmptyHaystack);
    }
    let key = case.key;
    let intro = model.tokenize(INTRO, false, false)?;
    let needle =
        model.tokenize(&format!("\nThe pass key is {key}. Remember it. {key} is the pass key.\n"), false, false)?;
    let question = model.tokenize(QUESTION, false, false)?;
    let bos: Vec<Token> = if model.add_bos() { vec![model.token_bos()] } else { Vec::new() };
    let fixed = bos.len() + intro.len() + needle.len() + question.len() + ANSWER_TOKENS;
    let hay_len =
        (case.n_ctx as usize).checked_sub(fixed).filter(|&n| n > 0).ok_or(PasskeyError::TooShort(case.n_ctx))?;
    let hay: Vec<Token> = haystack.iter().copied().cycle().take(hay_len).collect();
    let at = (case.depth * hay_len as f64).round() as usize;
    let mut out = Vec::with_capacity(fixed + hay_len);
    out.extend(bos);
    out.extend(intro);
    out.extend_from_slice(&hay[..at]);
    out.extend(needle);
    out.extend_from_slice(&hay[at..]);
    out.extend(question);
    Ok(out)
}

/// The first run of digits in `answer`, if any.
pub fn key_in(answer: &str) -> Option<u32> {
    let digits: String =
        answer.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Answers `case` under `config` (its cache types; context and batch sizes are set here):
/// the prompt, then up to 8 tokens chosen greedily.
pub fn answer(
    model: &Model,
    haystack: &[Token],
    config: (&str, &ContextParams),
    case: &Case,
) -> Result<Outcome, PasskeyError> {
    let start = std::time::Instant::now();
    let tokens = prompt(model, haystack, case)?;
    let n_ctx = case.n_ctx;
    let params = ContextParams { n_ctx, n_batch: 512, n_ubatch: 512, n_seq_max: 1, ..config.1.clone() };
    let mut ctx = Context::new(model, &params).map_err(|source| PasskeyError::Context { n_ctx, source })?;
    let decode_err = |source| PasskeyError::Decode { n_ctx, source };
    ctx.decode_prompt(&tokens, 0, 512).map_err(decode_err)?;
    let answer = ctx.generate_greedy(tokens.len() as i32, ANSWER_TOKENS, |_| false).map_err(decode_err)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    Ok(Outcome {
        config: config.0.to_string(),
        case: case.clone(),
        correct: key_in(&answer) == Some(case.key),
        answer,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_five_digits_differ_by_case_and_repeat_by_seed() {
        let a = cases(&[4096, 16384], &[0.1, 0.5, 0.9], 7);
        assert_eq!(a.len(), 6);
        assert!(a.iter().all(|c| (10_000..100_000).contains(&c.key)));
        let keys: std::collections::BTreeSet<u32> = a.iter().map(|c| c.key).collect();
        assert_eq!(keys.len(), 6, "{a:?}");
        assert_eq!(a, cases(&[4096, 16384], &[0.1, 0.5, 0.9], 7));
        assert_ne!(a, cases(&[4096, 16384], &[0.1, 0.5, 0.9], 8));
    }

    #[test]
    fn the_answer_is_the_first_number() {
        assert_eq!(key_in(" 71432. Remember"), Some(71432));
        assert_eq!(key_in(" seventy"), None);
        assert_eq!(key_in("71432"), Some(71432));
        assert_eq!(key_in(" 7143"), Some(7143));
    }
}
