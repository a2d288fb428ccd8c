//! Markdown for selections and their held-out checks (what `search --report` and `tune` write).

use std::fmt::Write as _;

use super::{correlation, AtSize, HeldOut, Measured, Selection};

const HEADER: &str = "| configuration | bits/value | KV MiB | predicted KLD | measured KLD | p99 KLD | top-1 same | PPL |\n|---|---|---|---|---|---|---|---|";

fn row(m: &Measured) -> String {
    row_marked(m, "")
}

fn row_marked(m: &Measured, mark: &str) -> String {
    let s = &m.summary;
    format!(
        "| {}{mark} | {:.2} | {:.3} | {} | {:.5} ± {:.5} | {:.5} | {:.2}% | {:.3} |",
        m.candidate.label,
        m.kv.bits_per_value(),
        m.kv.tensor_bytes as f64 / 1048576.0,
        m.candidate.predicted.map_or("-".into(), |p| format!("{p:.5}")),
        s.kld_mean,
        s.kld_stderr,
        s.kld_p99,
        s.top1 * 100.0,
        s.ppl
    )
}

/// The candidates a selection measured (calibration text) and its verdict.
pub fn selection(sel: &Selection) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "{}\n\nMeasured on {} (chooses):\n\n{HEADER}", sel.verdict(), sel.text);
    let mut rows: Vec<&Measured> = sel.considered.iter().collect();
    rows.sort_by(|a, b| a.kld().total_cmp(&b.kld()));
    for m in rows {
        let mark = if m.candidate.key() == sel.chosen.candidate.key() { " **(chosen)**" } else { "" };
        let _ = writeln!(r, "{}", row_marked(m, mark));
    }
    if !sel.screened_out.is_empty() {
        let list: Vec<String> = sel.screened_out.iter().map(|s| format!("{} {:.5}", s.label, s.kld_screen)).collect();
        let _ = writeln!(
            r,
            "\nScreened out on the first {} chunk(s) (KLD there: profiles behind the finalists, uniform caches over {}× the best uniform one): {}",
            sel.screened_out[0].chunks,
            crate::select::UNIFORM_SCREEN_FACTOR,
            list.join(", ")
        );
    }
    if !sel.passkey.is_empty() {
        let list: Vec<String> = sel.passkey.iter().map(|p| format!("{} {}", p.label, p.describe())).collect();
        let _ = writeln!(
            r,
            "\nPasskey veto (keys hidden in the calibration text; a profile must find as many as the best uniform cache): {}",
            list.join(", ")
        );
    }
    if let Some(e) = prediction_error(&sel.considered) {
        let _ = writeln!(
            r,
            "\nPrediction error on this text: median |measured / predicted − 1| = {e:.2} over {} configurations",
            sel.considered.len()
        );
    }
    r
}

/// Median of |measured / predicted − 1| over configurations with a positive prediction.
pub fn prediction_error(measured: &[Measured]) -> Option<f64> {
    let mut errs: Vec<f64> = measured
        .iter()
        .filter_map(|m| m.candidate.predicted.filter(|p| *p > 0.0).map(|p| (m.kld() / p - 1.0).abs()))
        .collect();
    if errs.is_empty() {
        return None;
    }
    errs.sort_by(|a, b| a.total_cmp(b));
    Some(errs[errs.len() / 2])
}

/// A selection's held-out checks.
pub fn held_out(checks: &[HeldOut]) -> String {
    let mut r = String::new();
    for h in checks {
        let _ = writeln!(r, "\nHeld out, {} (reports, never chooses):\n\n{HEADER}", h.text);
        let _ = writeln!(r, "{}", row(&h.chosen));
        if h.uniform.candidate.key() != h.chosen.candidate.key() {
            let _ = writeln!(r, "{}", row(&h.uniform));
        }
        if let Some(x) = &h.heuristic {
            let _ = writeln!(r, "{}", row(x));
        }
        let _ = writeln!(r, "\nchosen / {}: {:.3}", h.uniform.candidate.label, h.ratio());
    }
    r
}

/// Selections at the size of each uniform configuration, their held-out checks, the ratio table
/// and how well predictions track measurements.
pub fn sizes(sizes: &[AtSize]) -> String {
    let mut r = String::new();
    for s in sizes {
        let _ = writeln!(r, "### At the size of {}\n\n{}", s.uniform.label, selection(&s.selection));
        let _ = writeln!(r, "{}", held_out(&s.held_out));
    }
    let texts: Vec<&str> = sizes.first().map_or(Vec::new(), |s| s.held_out.iter().map(|h| h.text.as_str()).collect());
    let _ = write!(r, "### Summary: chosen KLD / uniform KLD at equal or fewer runtime bytes\n\n| size of | chosen | on the calibration text |");
    for t in &texts {
        let _ = write!(r, " held out: {t} | vs first/last ({t}) |");
    }
    let _ = write!(r, "\n|---|---|---|");
    for _ in &texts {
        let _ = write!(r, "---|---|");
    }
    let _ = writeln!(r);
    for s in sizes {
        let cal_uniform = s.selection.considered.iter().find(|m| m.candidate.types == s.uniform.types);
        let cal = cal_uniform.map_or("-".into(), |u| format!("{:.3}", s.selection.chosen.kld() / u.kld()));
        let _ = write!(r, "| {} | {} | {cal} |", s.uniform.label, s.selection.chosen.candidate.label);
        for h in &s.held_out {
            let vs_h = h.heuristic.as_ref().map_or("-".into(), |x| format!("{:.3}", h.chosen.kld() / x.kld()));
            let _ = write!(r, " {:.3} | {vs_h} |", h.ratio());
        }
        let _ = writeln!(r);
    }
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (t, text) in texts.iter().enumerate() {
        points.clear();
        for s in sizes {
            let h = &s.held_out[t];
            for m in [Some(&h.chosen), Some(&h.uniform), h.heuristic.as_ref()].into_iter().flatten() {
                if let Some(p) = m.candidate.predicted {
                    points.push((p, m.kld()));
                }
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup();
        if let Some(rho) = correlation(&points) {
            let _ = writeln!(
                r,
                "\nPredicted vs measured KLD on {}, over the {} configurations checked there: Pearson r = {rho:.3}",
                text,
                points.len()
            );
        }
    }
    r
}
