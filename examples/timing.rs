use std::time::Instant;
use kvtuner::llama::*;
fn main() {
    let m = Model::load(Backend::init(), std::path::Path::new("/root/.cache/kvtuner/gemma-3-270m-q4_k_m.gguf"), &ModelParams::default()).unwrap();
    let text = kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).unwrap().calibration;
    let toks = m.tokenize(&text, true, false).unwrap();
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1024);
    let out_all = std::env::args().nth(2).is_some();
    let fa = match std::env::var("FA").as_deref() { Ok("on") => FlashAttn::On, Ok("off") => FlashAttn::Off, _ => FlashAttn::Auto };
    let tk = std::env::var("TK").ok().map(|s| s.parse().unwrap()).unwrap_or(kvtuner::cache_type::CacheType::F16);
    let p = ContextParams { flash_attn: fa, type_k: tk, n_ctx: n as u32, n_batch: n as u32, n_ubatch: 512, n_threads: 2, no_kv_profile: true, ..Default::default() };
    let t = Instant::now();
    let mut ctx = Context::new(&m, &p).unwrap();
    println!("ctx {:?}", t.elapsed());
    for rep in 0..2 {
        let t = Instant::now();
        ctx.clear();
        let mut b = Batch::new(n);
        b.add_sequence(&toks[..n], 0, 0, |i| out_all || i >= n / 2).unwrap();
        ctx.decode(&b).unwrap();
        println!("rep {rep}: decode {:?}", t.elapsed());
        let t = Instant::now();
        let mut acc = 0f64;
        for pos in n / 2..n - 1 {
            let l = ctx.logits(pos as i32).unwrap();
            acc += l[5] as f64;
        }
        println!("  logits fetch {:?} {acc}", t.elapsed());
        let t = Instant::now();
        let l = ctx.logits((n - 2) as i32).unwrap().to_vec();
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let within = l.iter().filter(|&&x| x > max - 30.0).count();
        let mut s = 0f64;
        for _ in 0..511 { for &x in &l { if x > max - 30.0 { s += ((x - max) as f64).exp(); } } }
        println!("  511 lse rows {:?} within-cutoff {within} of {} {s}", t.elapsed(), l.len());
    }
}
#[allow(dead_code)]
fn unused() {}
