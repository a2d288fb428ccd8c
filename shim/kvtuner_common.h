// kvtuner's C interface over llama.cpp's common/ (C++): the model's chat template rendered by
// common/chat.cpp (Jinja, tools, the parsers of tool-call formats), JSON schema → GBNF, and
// llama-server's sampler (penalties, logit bias, lazy tool-call grammars). Data crosses as JSON
// text; every returned string is freed with kvt_string_free. Functions that can fail return
// non-zero and set *error to a message (also freed with kvt_string_free); none throws.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

void kvt_string_free(char * s);

// Chat templates of a model. `override_template`: NULL = the model's own (tokenizer.chat_template
// and its tool_use variant); else Jinja source, or with use_jinja = false the name of a template
// llama.cpp implements in C++ (`llama_chat_builtin_templates`).
struct kvt_chat_templates;
int kvt_chat_templates_init(const struct llama_model * model, const char * override_template, bool use_jinja,
                            struct kvt_chat_templates ** out, char ** error);
void kvt_chat_templates_free(struct kvt_chat_templates * tmpls);

// {"source": "...", "caps": {"supports_tools": true, ...}}
int kvt_chat_templates_info(const struct kvt_chat_templates * tmpls, char ** out_json, char ** error);

// Renders a request. inputs_json: {"messages": [OpenAI messages], "tools": [OpenAI tools] | null,
// "tool_choice": "auto"|"none"|"required", "parallel_tool_calls": bool, "json_schema": object | null,
// "grammar": string | null, "add_generation_prompt": bool, "enable_thinking": bool,
// "reasoning_format": "none"|"auto"|"deepseek"|..., "chat_template_kwargs": {name: value}}.
// out_json: {"prompt", "grammar", "grammar_lazy", "grammar_triggers": [{"type", "value"}],
// "preserved_tokens", "additional_stops", "format", "generation_prompt", "parser",
// "supports_thinking"}; `parser` is the serialized output parser kvt_chat_parser_init takes.
int kvt_chat_apply(const struct kvt_chat_templates * tmpls, const char * inputs_json, char ** out_json,
                   char ** error);

// The parser of one reply. params_json: {"format": name, "generation_prompt", "parser",
// "reasoning_format", "parse_tool_calls": bool}.
struct kvt_chat_parser;
int kvt_chat_parser_init(const char * params_json, struct kvt_chat_parser ** out, char ** error);
void kvt_chat_parser_free(struct kvt_chat_parser * parser);
// The reply so far (`partial`: more may come) as an OpenAI assistant message:
// {"role", "content", "reasoning_content"?, "tool_calls"?: [{"type", "id", "function": {"name", "arguments"}}]}.
int kvt_chat_parse(const struct kvt_chat_parser * parser, const char * text, size_t len, bool partial,
                   char ** out_json, char ** error);

// A JSON schema (JSON text) as a GBNF grammar.
int kvt_json_schema_to_grammar(const char * schema_json, char ** out_grammar, char ** error);

// llama-server's sampler for one request. params_json: {"seed", "temperature", "top_k", "top_p",
// "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
// "logit_bias": [[token, bias], ...], "grammar", "grammar_kind": "user"|"output_format"|"tool_calls",
// "grammar_lazy", "grammar_triggers": [{"type": "token"|"word"|"pattern"|"pattern_full", "value", "token"}],
// "preserved_tokens": [token, ...], "generation_prompt"}.
struct kvt_sampler;
int kvt_sampler_init(const struct llama_model * model, const char * params_json, struct kvt_sampler ** out,
                     char ** error);
void kvt_sampler_free(struct kvt_sampler * sampler);
// Samples from output `idx` of the last decode and accepts the token (grammar and penalties
// advance). Returns LLAMA_TOKEN_NULL and sets *error if sampling failed (e.g. a grammar with no
// allowed token).
llama_token kvt_sampler_sample(struct kvt_sampler * sampler, struct llama_context * ctx, int idx, char ** error);

#ifdef __cplusplus
}
#endif
