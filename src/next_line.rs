//! Next-line exact match on code at long context: the model reads the first tokens of a held-out
//! source text and, at cut points spread over the second half of the context, writes the next
//! line greedily; a case counts when the line is exactly the source's (trailing whitespace
//! aside). The cut lines are ones that already occur earlier in the context (a call, a
//! signature, a guard written before): what the model can only get right by reading far back
//! precisely, which is what a narrow cache endangers; a wrong character is a wrong line. Beside
//! the source, each answer is compared with the first configuration's (the f16 reference):
//! how often the cache alone changes the line.
//!
//! One pass reads the text once per configuration: at each cut the answer is generated into the
//! same sequence, then removed (`Context::remove_range`) and the text continues from the cut, so
//! N cases cost one prefill of the context plus N short answers.

use serde::Serialize;

use crate::llama::{Context, ContextParams, CreateContextError, DecodeError, Model, Token, TokenizeError};

/// Tokens generated for a line at most; a target line is at most `MAX_LINE_CHARS` long.
const ANSWER_TOKENS: usize = 64;
const MAX_LINE_CHARS: usize = 160;
/// A target line has at least this many non-blank characters (not `)` or `else:` alone).
const MIN_LINE_CHARS: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum NextLineError {
    #[error("tokenizing the source text")]
    Tokenize(#[from] TokenizeError),
    #[error("a context of {n_ctx} tokens for next-line cases")]
    Context { n_ctx: u32, source: CreateContextError },
    #[error("decoding at position {pos} of a {n_ctx}-token context")]
    Decode { n_ctx: u32, pos: usize, source: DecodeError },
    #[error("the source text has {have} tokens; next-line cases at context {n_ctx} need {need}")]
    TextTooShort { n_ctx: u32, have: usize, need: usize },
    #[error("no line of the source text between tokens {from} and {to} can be a case")]
    NoCase { from: usize, to: usize },
    #[error("this cache cannot drop the answer's tokens (positions {from}..) to read on: {config}")]
    CannotRewind { config: String, from: usize },
}

/// A cut: the prompt is the first `at` tokens of the text, the answer is `line`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    pub n_ctx: u32,
    pub at: usize,
    pub line: String,
}

/// A case answered under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub config: String,
    #[serde(flatten)]
    pub case: Case,
    pub answer: String,
    pub correct: bool,
    /// The same line as the first configuration's (set by the caller; true for the first).
    pub same_as_reference: bool,
}

/// Up to `n` cuts spread evenly over token positions `from..to` of a text given as the bytes of
/// each token: a cut sits right after a token holding a newline followed only by blanks (the
/// indentation may ride along with the newline); its line, up to the next newline, has at least
/// `MIN_LINE_CHARS` non-blank characters and at most `MAX_LINE_CHARS`, and occurs earlier in the
/// text. Each cut is the first such position at or after its share of the span; duplicates are
/// dropped.
pub fn cuts(pieces: &[Vec<u8>], from: usize, to: usize, n: usize) -> Vec<(usize, String)> {
    let to = to.min(pieces.len());
    let mut out: Vec<(usize, String)> = Vec::new();
    if n == 0 || from >= to {
        return out;
    }
    // byte offset of each token in the text, to look for a line before a cut
    let mut text = Vec::new();
    let mut starts = Vec::with_capacity(pieces.len());
    for p in pieces {
        starts.push(text.len());
        text.extend_from_slice(p);
    }
    let earlier = |at: usize, line: &str| {
        let needle = line.trim().as_bytes();
        text[..starts[at]].windows(needle.len()).any(|w| w == needle)
    };
    for i in 0..n {
        let start = from + (to - from) * i / n;
        let found = (start.max(1)..to).find_map(|at| {
            let prev = &pieces[at - 1];
            let nl = prev.iter().rposition(|&b| b == b'\n')?;
            if !prev[nl + 1..].iter().all(|b| *b == b' ' || *b == b'\t') {
                return None;
            }
            let line = line_from(&pieces[at..])?;
            let solid = line.chars().filter(|c| !c.is_whitespace()).count();
            (solid >= MIN_LINE_CHARS && line.chars().count() <= MAX_LINE_CHARS && earlier(at, &line))
                .then_some((at, line))
        });
        if let Some(cut) = found {
            if out.last().is_none_or(|last| last.0 < cut.0) {
                out.push(cut);
            }
        }
    }
    out
}

/// The text of `pieces` up to its first newline (`None` if none comes within the line limit).
fn line_from(pieces: &[Vec<u8>]) -> Option<String> {
    let mut bytes = Vec::new();
    for p in pieces {
        if let Some(nl) = p.iter().position(|&b| b == b'\n') {
            bytes.extend_from_slice(&p[..nl]);
            return Some(String::from_utf8_lossy(&bytes).trim_end().to_string());
        }
        bytes.extend_from_slice(p);
        if bytes.len() > 4 * MAX_LINE_CHARS {
            return None;
        }
    }
    None
}

/// The cases of one context: `n` cuts in the second half of `n_ctx` (room left for the answer).
pub fn cases(model: &Model, text: &[Token], n_ctx: u32, n: usize) -> Result<Vec<Case>, NextLineError> {
    let bos = usize::from(model.add_bos());
    let to = (n_ctx as usize).saturating_sub(ANSWER_TOKENS + bos);
    // the text after the last cut's line must be there too
    let need = to + 2 * ANSWER_TOKENS;
    if text.len() < need {
        return Err(NextLineError::TextTooShort { n_ctx, have: text.len(), need });
    }
    let pieces: Vec<Vec<u8>> = text[..need].iter().map(|&t| model.token_piece_bytes(t, false)).collect();
    let from = to / 2;
    let found = cuts(&pieces, from, to, n);
    if found.is_empty() {
        return Err(NextLineError::NoCase { from, to });
    }
    Ok(found.into_iter().map(|(at, line)| Case { n_ctx, at, line }).collect())
}

/// Answers every case of one context under `config`, in one pass over `text`.
pub fn answer_all(
    model: &Model,
    text: &[Token],
    config: (&str, &ContextParams),
    cases: &[Case],
) -> Result<Vec<Outcome>, NextLineError> {
    let Some(n_ctx) = cases.first().map(|c| c.n_ctx) else { return Ok(Vec::new()) };
    let params = ContextParams { n_ctx, n_batch: 512, n_ubatch: 512, n_seq_max: 1, ..config.1.clone() };
    let mut ctx = Context::new(model, &params).map_err(|source| NextLineError::Context { n_ctx, source })?;
    let bos: Vec<Token> = if model.add_bos() { vec![model.token_bos()] } else { Vec::new() };
    // position in the context of text token i: i + bos.len()
    let off = bos.len();
    ctx.decode_prompt(&bos, 0, 512).map_err(|source| NextLineError::Decode { n_ctx, pos: 0, source })?;
    let mut fed = 0; // text tokens in the cache
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        // read on to the cut, the last token's logits kept
        ctx.decode_prompt(&text[fed..case.at], (fed + off) as i32, 512).map_err(|source| NextLineError::Decode {
            n_ctx,
            pos: fed + off,
            source,
        })?;
        fed = case.at;
        let answer = ctx
            .generate_greedy((case.at + off) as i32, ANSWER_TOKENS, |b| b.contains(&b'\n'))
            .map_err(|source| NextLineError::Decode { n_ctx, pos: case.at + off, source })?;
        // the answer's tokens out of the cache, so the text goes on from the cut
        if !ctx.remove_range(0, (case.at + off) as i32, -1) {
            return Err(NextLineError::CannotRewind { config: config.0.to_string(), from: case.at + off });
        }
        let line = String::from_utf8_lossy(&answer);
        let line = line.split('\n').next().unwrap_or("").trim_end().to_string();
        out.push(Outcome {
            config: config.0.to_string(),
            case: case.clone(),
            correct: line == case.line,
            answer: line,
            same_as_reference: true,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    #[test]
    fn cuts_sit_after_a_newline_and_take_a_whole_line_seen_before() {
        let p = pieces(&[
            "def",
            " f",
            "(x):",
            "\n    ",
            "return",
            " compute",
            "(x,",
            " y)",
            "\n",
            "\n",
            "x",
            " =",
            " 1",
            "\n",
            "print",
            "(\"hello",
            " world\")",
            "\n",
            "def",
            " g",
            "(x):",
            "\n    ",
            "return",
            " compute",
            "(x,",
            " y)",
            "\n",
            "print",
            "(\"hello",
            " world\")",
            "\n",
        ]);
        // from 0: the first cut whose line came before is g's body (f's is the first time)
        assert_eq!(cuts(&p, 0, p.len(), 1), vec![(22, "return compute(x, y)".to_string())]);
        // a line must come before the cut: the first print is new, the second is not; "x = 1"
        // is too short to be a case, and a blank line is none
        assert_eq!(cuts(&p, 9, p.len(), 1), vec![(22, "return compute(x, y)".to_string())]);
        assert_eq!(cuts(&p, 23, p.len(), 1), vec![(27, "print(\"hello world\")".to_string())]);
        // two shares landing on one cut keep it once; a share past the last line finds none
        assert_eq!(cuts(&p, 0, p.len(), 2).iter().map(|c| c.0).collect::<Vec<_>>(), vec![22]);
        assert_eq!(cuts(&p, 0, p.len(), 4).iter().map(|c| c.0).collect::<Vec<_>>(), vec![22, 27]);
        assert!(cuts(&p, 28, p.len(), 3).is_empty());
    }

    #[test]
    fn a_token_with_text_after_its_newline_is_not_a_cut() {
        let p = pieces(&["return compute(x, y, z)", "\n", ")\nreturn", " compute(x, y, z)", "\n"]);
        assert!(cuts(&p, 0, p.len(), 1).is_empty());
    }
}
