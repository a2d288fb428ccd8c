//! Token samplers (greedy, or the usual temperature / top-k / top-p / min-p chain).

use std::ptr::NonNull;

use super::context::Context;
use super::model::Token;
use super::sys;

#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, seed: 0xC0FFEE }
    }
}

#[derive(Debug)]
pub struct Sampler {
    raw: NonNull<sys::llama_sampler>,
}

// Safety: a sampler chain has no thread affinity; it is used from one thread at a time (&mut).
unsafe impl Send for Sampler {}

impl Drop for Sampler {
    fn drop(&mut self) {
        // Safety: the chain came from llama_sampler_chain_init and owns its samplers; freed once.
        unsafe { sys::llama_sampler_free(self.raw.as_ptr()) };
    }
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Sampler {
        // Safety: plain struct of defaults, then a new chain that llama.cpp allocates.
        let chain = unsafe { sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params()) };
        let raw = NonNull::new(chain).expect("llama_sampler_chain_init returned NULL");
        let s = Sampler { raw };
        // Safety (all adds below): the chain takes ownership of each new sampler.
        unsafe {
            if params.temperature <= 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            } else {
                if params.top_k > 0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(params.top_k));
                }
                if params.top_p < 1.0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(params.top_p, 1));
                }
                if params.min_p > 0.0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_min_p(params.min_p, 1));
                }
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(params.temperature));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(params.seed));
            }
        }
        s
    }

    pub fn greedy() -> Sampler {
        Sampler::new(&SamplingParams { temperature: 0.0, ..SamplingParams::default() })
    }

    /// Samples from the logits of output `idx` of the last decode and records the choice.
    pub fn sample(&mut self, ctx: &mut Context<'_>, idx: i32) -> Token {
        // Safety: valid chain and context; idx is checked by llama.cpp.
        unsafe { sys::llama_sampler_sample(self.raw.as_ptr(), ctx.as_ptr(), idx) }
    }
}
