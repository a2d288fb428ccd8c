//! A batch of tokens for one decode call.

use std::ptr::NonNull;

use super::model::Token;
use super::sys;

#[derive(Debug, thiserror::Error)]
#[error("batch is full ({0} tokens)")]
pub struct BatchFull(pub usize);

/// Tokens with positions, one sequence id each, and which ones produce logits.
#[derive(Debug)]
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

// Safety: the batch owns its arrays (allocated by llama_batch_init, freed once in Drop) and has
// no thread affinity; it is used from one thread at a time (&mut to fill it).
unsafe impl Send for Batch {}

impl Drop for Batch {
    fn drop(&mut self) {
        // Safety: `raw` came from llama_batch_init and is freed exactly once.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}

impl Batch {
    pub fn new(capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        // Safety: allocates arrays for `capacity` tokens with one sequence id each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        // llama_batch_init aborts on allocation failure, so the arrays are non-NULL here.
        assert!(NonNull::new(raw.token).is_some(), "llama_batch_init returned no token array");
        Batch { raw, capacity }
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn add(&mut self, token: Token, pos: i32, seq: i32, logits: bool) -> Result<(), BatchFull> {
        let i = self.raw.n_tokens as usize;
        if i >= self.capacity {
            return Err(BatchFull(self.capacity));
        }
        // Safety: i < capacity, and every array was allocated for `capacity` entries
        // (seq_id[i] for one id).
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        Ok(())
    }

    /// Adds `tokens` at positions `start..`, asking for logits of those `want_logits` accepts
    /// (by index in `tokens`).
    pub fn add_sequence(
        &mut self,
        tokens: &[Token],
        start: i32,
        seq: i32,
        want_logits: impl Fn(usize) -> bool,
    ) -> Result<(), BatchFull> {
        for (i, &t) in tokens.iter().enumerate() {
            self.add(t, start + i as i32, seq, want_logits(i))?;
        }
        Ok(())
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}
