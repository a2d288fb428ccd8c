//! A long-context task as a veto on the choice. KLD over chunks ranks the candidates, but a cache
//! can score well there and still lose what long contexts are used for: a window chosen per layer
//! kept old keys at 2 bits on Gemma's global layers, measured 0.25× the uniform cache's KLD and
//! found none of three passkeys at 8192 tokens where the uniform cache found one
//! (bench/tune-window-per-layer.md). With a veto the measured configurations are walked from the
//! lowest KLD, and the first that retrieves at least as many passkeys at the target context as the
//! best uniform cache of the budget is chosen (that uniform cache itself if none does). The
//! haystack is the calibration text: the veto is part of the choice, and the held-out text stays
//! unseen by it.

use serde::Serialize;

use super::{Candidate, Measured, Measurer, SelectError, Selection};
use crate::llama::Token;
use crate::passkey::{self, Case};

/// Passkey retrieval every profile must match the best uniform cache at.
#[derive(Debug, Clone)]
pub struct PasskeyVeto {
    /// Tokens the needles are hidden in (the calibration text's).
    pub haystack: Vec<Token>,
    /// The retrievals (their context is the target context).
    pub cases: Vec<Case>,
}

impl PasskeyVeto {
    /// Cases at depths `depths` of `n_ctx`-token prompts in `haystack`, keys from a fixed seed (so
    /// every configuration answers the same prompts).
    pub fn new(haystack: Vec<Token>, n_ctx: u32, depths: &[f64]) -> PasskeyVeto {
        PasskeyVeto { haystack, cases: passkey::cases(&[n_ctx], depths, 42) }
    }
}

/// Keys a configuration found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PasskeyScore {
    pub label: String,
    pub found: usize,
    pub cases: usize,
    pub n_ctx: u32,
}

impl PasskeyScore {
    pub fn describe(&self) -> String {
        format!("{}/{} passkeys at {}", self.found, self.cases, self.n_ctx)
    }
}

impl Measurer<'_, '_> {
    /// Every choice of this measurer must retrieve as many passkeys as the best uniform cache.
    pub fn with_passkey_veto(mut self, veto: Option<PasskeyVeto>) -> Self {
        self.veto = veto;
        self
    }

    fn passkeys(&self, veto: &PasskeyVeto, c: &Candidate) -> Result<PasskeyScore, SelectError> {
        let params = self.params(&c.types, &c.windowed);
        let mut found = 0;
        for case in &veto.cases {
            let o = passkey::answer(self.ev.model(), &veto.haystack, (&c.label, &params), case)?;
            let said = if o.correct { "found" } else { "missed" };
            tracing::info!(
                "passkey at depth {:.2} of {}: {} {said} it ({:.0} s)",
                case.depth,
                case.n_ctx,
                c.label,
                o.seconds
            );
            found += usize::from(o.correct);
        }
        Ok(PasskeyScore { label: c.label.clone(), found, cases: veto.cases.len(), n_ctx: self.target_ctx })
    }

    /// The measurer's veto applied to `selection` ([`apply`]); without a veto, the selection as it is.
    pub(super) fn veto(&self, selection: Selection) -> Result<Selection, SelectError> {
        match &self.veto {
            None => Ok(selection),
            Some(veto) => apply(selection, |c| self.passkeys(veto, c)),
        }
    }
}

/// The veto's rule: `selection`'s configurations from the lowest KLD (ties as the choice breaks
/// them), the first to find as many passkeys (`score`) as the best uniform cache chosen, that
/// uniform cache if none does. Without a uniform cache to match, only the chosen one is scored.
fn apply(
    mut selection: Selection,
    mut score: impl FnMut(&Candidate) -> Result<PasskeyScore, SelectError>,
) -> Result<Selection, SelectError> {
    let Some(uniform) = selection.best_uniform.clone() else {
        selection.passkey.push(score(&selection.chosen.candidate)?);
        return Ok(selection);
    };
    let bar = score(&uniform.candidate)?;
    let mut order: Vec<&Measured> = selection.considered.iter().collect();
    order.sort_by(|a, b| super::rank(a, b));
    let mut chosen = uniform.clone();
    for m in order.into_iter().take_while(|m| m.candidate.key() != uniform.candidate.key()) {
        let own = score(&m.candidate)?;
        let passes = own.found >= bar.found;
        selection.passkey.push(own);
        if passes {
            chosen = m.clone();
            break;
        }
        selection.vetoed.push(m.candidate.label.clone());
    }
    selection.passkey.push(bar);
    selection.profile_wins = !chosen.is_uniform();
    selection.chosen = chosen;
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_type::CacheType::{Q4_0, Q8_0};
    use crate::select::tests::{measured, profile};
    use crate::select::Origin;

    /// A selection among the uniform cache (KLD 0.30) and profiles p1 (0.10), p2 (0.20) and p3
    /// (0.40, worse than the uniform cache), chosen by KLD alone, then vetoed with `found` keys
    /// of three per label.
    fn vetoed(found: &[(&str, usize)]) -> (Selection, Vec<String>) {
        let uniform = measured("uniform q4_0", Origin::Uniform, vec![(Q4_0, Q4_0); 2], 100, 0.30);
        let mut considered = vec![profile(2, 100, 0.20), uniform, profile(1, 90, 0.10), profile(3, 80, 0.40)];
        considered.push(measured("uniform q8_0/q4_0", Origin::Uniform, vec![(Q8_0, Q4_0); 2], 100, 0.35));
        let selection = super::super::choose(considered, 100, "cal");
        assert_eq!(selection.chosen.candidate.label, "p1");
        let mut asked = Vec::new();
        let s = apply(selection, |c| {
            asked.push(c.label.clone());
            let found = found.iter().find(|f| f.0 == c.label).map_or(0, |f| f.1);
            Ok(PasskeyScore { label: c.label.clone(), found, cases: 3, n_ctx: 8192 })
        })
        .unwrap();
        (s, asked)
    }

    #[test]
    fn a_profile_that_finds_fewer_passkeys_than_the_uniform_cache_is_passed_over() {
        let (s, asked) = vetoed(&[("uniform q4_0", 2), ("p1", 1), ("p2", 2)]);
        assert_eq!(s.chosen.candidate.label, "p2");
        assert!(s.profile_wins);
        assert_eq!(s.vetoed, ["p1"]);
        // the uniform cache first (the bar), then from the lowest KLD until one passes
        assert_eq!(asked, ["uniform q4_0", "p1", "p2"]);
        let scores: Vec<(&str, usize)> = s.passkey.iter().map(|p| (p.label.as_str(), p.found)).collect();
        assert_eq!(scores, [("p1", 1), ("p2", 2), ("uniform q4_0", 2)]);
        assert!(s.verdict().contains("fewer found, so not chosen: p1"), "{}", s.verdict());
    }

    #[test]
    fn the_lowest_kld_is_kept_when_it_finds_as_many_and_the_uniform_cache_when_none_does() {
        let (s, asked) = vetoed(&[("uniform q4_0", 1), ("p1", 3)]);
        assert_eq!((s.chosen.candidate.label.as_str(), asked.len()), ("p1", 2));
        assert!(s.vetoed.is_empty());
        // p3 measured worse than the uniform cache: never asked, never chosen
        let (s, asked) = vetoed(&[("uniform q4_0", 2), ("p1", 1), ("p2", 0), ("p3", 3)]);
        assert_eq!(s.chosen.candidate.label, "uniform q4_0");
        assert!(!s.profile_wins);
        assert_eq!(s.vetoed, ["p1", "p2"]);
        assert_eq!(asked, ["uniform q4_0", "p1", "p2"]);
        assert!(s.verdict().starts_with("no profile measured better"), "{}", s.verdict());
    }
}
