//! Safe wrapper over the patched llama.cpp: every handle is `NonNull` + `Drop`, a context
//! borrows its model, the backend is initialised once, and no raw pointer leaves this module.

mod backend;
mod batch;
mod common;
mod context;
mod gguf_c;
mod model;
pub mod rpc;
mod sampler;
pub(crate) mod sys;

pub use backend::Backend;
pub use batch::{Batch, BatchFull};
pub use common::{
    json_schema_to_grammar, AppliedTemplate, ChatParser, ChatTemplates, CommonError, CommonSampler, GrammarKind,
    GrammarTrigger, ParsedReply, SamplerSpec, TemplateCaps, TemplateSource, ToolCall,
};
pub use context::{
    BufferMemory, Context, ContextParams, CreateContextError, DecodeError, DeviceName, FlashAttn, KvLayerInfo,
    LayerCacheTypes, Perf, RecentWindow, StateError,
};
pub use gguf_c::{GgufCError, GgufCSummary, GgufCTensor};
pub use model::{
    builtin_templates, ChatMessage, LoadModelError, Model, ModelParams, TemplateError, Token, TokenizeError,
};
pub use sampler::{Sampler, SamplingParams};
