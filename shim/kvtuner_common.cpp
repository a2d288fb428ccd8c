// See kvtuner_common.h. Thin on purpose: requests are validated in Rust before they get here;
// this file only moves JSON into common/'s structs and back, and turns exceptions into errors.

#include "kvtuner_common.h"

#include "chat.h"
#include "common.h"
#include "json-schema-to-grammar.h"
#include "sampling.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

struct kvt_chat_templates {
    common_chat_templates_ptr tmpls;
    bool use_jinja;
};

struct kvt_chat_parser {
    common_chat_parser_params params;
};

struct kvt_sampler {
    common_sampler * smpl;
};

namespace {

char * dup(const std::string & s) {
    char * out = static_cast<char *>(std::malloc(s.size() + 1));
    if (out) {
        std::memcpy(out, s.data(), s.size());
        out[s.size()] = '\0';
    }
    return out;
}

// Runs f; an exception becomes *error and a non-zero return.
template <typename F> int guarded(char ** error, F && f) {
    try {
        f();
        return 0;
    } catch (const std::exception & e) {
        if (error) {
            *error = dup(e.what());
        }
    } catch (...) {
        if (error) {
            *error = dup("unknown C++ exception");
        }
    }
    return 1;
}

common_chat_tool_choice tool_choice_from(const std::string & s) {
    return common_chat_tool_choice_parse_oaicompat(s);
}

common_grammar_trigger_type trigger_type_from(const std::string & s) {
    if (s == "token") return COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN;
    if (s == "word") return COMMON_GRAMMAR_TRIGGER_TYPE_WORD;
    if (s == "pattern") return COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN;
    if (s == "pattern_full") return COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL;
    throw std::invalid_argument("unknown grammar trigger type: " + s);
}

const char * trigger_type_name(common_grammar_trigger_type t) {
    switch (t) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN: return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN: return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

common_chat_format format_from_name(const std::string & name) {
    for (int f = 0; f < COMMON_CHAT_FORMAT_COUNT; f++) {
        if (name == common_chat_format_name(static_cast<common_chat_format>(f))) {
            return static_cast<common_chat_format>(f);
        }
    }
    throw std::invalid_argument("unknown chat format: " + name);
}

}  // namespace

extern "C" {

void kvt_string_free(char * s) {
    std::free(s);
}

int kvt_chat_templates_init(const llama_model * model, const char * override_template, bool use_jinja,
                            kvt_chat_templates ** out, char ** error) {
    return guarded(error, [&] {
        auto tmpls = common_chat_templates_init(model, override_template ? override_template : "");
        if (!use_jinja) {
            // the legacy route renders with llama_chat_apply_template: check the name once here
            std::string name = override_template ? override_template : "";
            if (!common_chat_verify_template(name, false)) {
                throw std::invalid_argument("`" + name + "` is not a chat template llama.cpp implements");
            }
        }
        *out = new kvt_chat_templates{ std::move(tmpls), use_jinja };
    });
}

void kvt_chat_templates_free(kvt_chat_templates * tmpls) {
    delete tmpls;
}

int kvt_chat_templates_info(const kvt_chat_templates * tmpls, char ** out_json, char ** error) {
    return guarded(error, [&] {
        common_json caps = common_json::object();
        if (tmpls->use_jinja) {
            for (const auto & [name, value] : common_chat_templates_get_caps(tmpls->tmpls.get())) {
                caps[name] = value;
            }
        } else {
            // llama.cpp's C++ templates render text turns only
            caps["supports_tools"] = false;
            caps["supports_tool_calls"] = false;
        }
        common_json info = common_json::object();
        info["source"] = common_chat_templates_source(tmpls->tmpls.get());
        info["jinja"] = tmpls->use_jinja;
        info["caps"] = caps;
        *out_json = dup(info.dump());
    });
}

int kvt_chat_apply(const kvt_chat_templates * tmpls, const char * inputs_json, char ** out_json, char ** error) {
    return guarded(error, [&] {
        const common_json req = common_json::parse(inputs_json);
        common_chat_templates_inputs in;
        in.use_jinja = tmpls->use_jinja;
        in.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
        if (req.contains("tools") && !req.at("tools").is_null()) {
            in.tools = common_chat_tools_parse_oaicompat(req.at("tools"));
        }
        in.tool_choice = tool_choice_from(req.value("tool_choice", "auto"));
        in.parallel_tool_calls = req.value("parallel_tool_calls", false);
        if (req.contains("json_schema") && !req.at("json_schema").is_null()) {
            in.json_schema = req.at("json_schema").dump();
        }
        in.grammar = req.value("grammar", "");
        in.add_generation_prompt = req.value("add_generation_prompt", true);
        in.enable_thinking = req.value("enable_thinking", true);
        in.reasoning_format = common_reasoning_format_from_name(req.value("reasoning_format", "none"));
        if (req.contains("chat_template_kwargs")) {
            for (const auto & [key, value] : req.at("chat_template_kwargs").items()) {
                in.chat_template_kwargs[key] = value.dump();
            }
        }
        const common_chat_params p = common_chat_templates_apply(tmpls->tmpls.get(), in);

        common_json triggers = common_json::array();
        for (const auto & t : p.grammar_triggers) {
            common_json jt = common_json::object();
            jt["type"] = trigger_type_name(t.type);
            jt["value"] = t.value;
            triggers.push_back(jt);
        }
        common_json out = common_json::object();
        out["prompt"] = p.prompt;
        out["grammar"] = p.grammar;
        out["grammar_lazy"] = p.grammar_lazy;
        out["grammar_triggers"] = triggers;
        out["preserved_tokens"] = p.preserved_tokens;
        out["additional_stops"] = p.additional_stops;
        out["format"] = common_chat_format_name(p.format);
        out["generation_prompt"] = p.generation_prompt;
        out["parser"] = p.parser;
        out["supports_thinking"] = p.supports_thinking;
        *out_json = dup(out.dump());
    });
}

int kvt_chat_parser_init(const char * params_json, kvt_chat_parser ** out, char ** error) {
    return guarded(error, [&] {
        const common_json j = common_json::parse(params_json);
        auto parser = std::make_unique<kvt_chat_parser>();
        parser->params.format = format_from_name(j.value("format", "Content-only"));
        parser->params.generation_prompt = j.value("generation_prompt", "");
        parser->params.reasoning_format = common_reasoning_format_from_name(j.value("reasoning_format", "none"));
        parser->params.parse_tool_calls = j.value("parse_tool_calls", true);
        const std::string serialized = j.value("parser", "");
        if (!serialized.empty()) {
            parser->params.parser.load(serialized);
        }
        *out = parser.release();
    });
}

void kvt_chat_parser_free(kvt_chat_parser * parser) {
    delete parser;
}

int kvt_chat_parse(const kvt_chat_parser * parser, const char * text, size_t len, bool partial, char ** out_json,
                   char ** error) {
    return guarded(error, [&] {
        const common_chat_msg msg = common_chat_parse(std::string(text, len), partial, parser->params);
        common_json j = common_json::object();
        j["role"] = "assistant";
        j["content"] = msg.content;
        if (!msg.reasoning_content.empty()) {
            j["reasoning_content"] = msg.reasoning_content;
        }
        common_json calls = common_json::array();
        for (const auto & call : msg.tool_calls) {
            common_json fn = common_json::object();
            fn["name"] = call.name;
            fn["arguments"] = call.arguments;
            common_json jc = common_json::object();
            jc["type"] = "function";
            jc["id"] = call.id;
            jc["function"] = fn;
            calls.push_back(jc);
        }
        j["tool_calls"] = calls;
        *out_json = dup(j.dump());
    });
}

int kvt_json_schema_to_grammar(const char * schema_json, char ** out_grammar, char ** error) {
    return guarded(error, [&] { *out_grammar = dup(json_schema_to_grammar(common_json::parse(schema_json))); });
}

int kvt_sampler_init(const llama_model * model, const char * params_json, kvt_sampler ** out, char ** error) {
    return guarded(error, [&] {
        const common_json j = common_json::parse(params_json);
        common_params_sampling sp;
        sp.no_perf = true;
        sp.seed = j.value("seed", 0u);
        sp.temp = j.value("temperature", sp.temp);
        sp.top_k = j.value("top_k", sp.top_k);
        sp.top_p = j.value("top_p", sp.top_p);
        sp.min_p = j.value("min_p", sp.min_p);
        sp.typ_p = j.value("typical_p", sp.typ_p);
        sp.penalty_repeat = j.value("repeat_penalty", sp.penalty_repeat);
        sp.penalty_last_n = j.value("repeat_last_n", sp.penalty_last_n);
        sp.penalty_present = j.value("presence_penalty", sp.penalty_present);
        sp.penalty_freq = j.value("frequency_penalty", sp.penalty_freq);
        if (j.contains("logit_bias")) {
            for (const auto & pair : j.at("logit_bias")) {
                sp.logit_bias.push_back({ pair.at(0).get<int>(), pair.at(1).get<float>() });
            }
        }
        const std::string grammar = j.value("grammar", "");
        if (!grammar.empty()) {
            const std::string kind = j.value("grammar_kind", "user");
            const common_grammar_type type = kind == "tool_calls"      ? COMMON_GRAMMAR_TYPE_TOOL_CALLS :
                                             kind == "output_format" ? COMMON_GRAMMAR_TYPE_OUTPUT_FORMAT :
                                                                       COMMON_GRAMMAR_TYPE_USER;
            sp.grammar = common_grammar(type, grammar);
        }
        sp.grammar_lazy = j.value("grammar_lazy", false);
        if (j.contains("grammar_triggers")) {
            for (const auto & t : j.at("grammar_triggers")) {
                common_grammar_trigger trigger;
                trigger.type = trigger_type_from(t.at("type").get<std::string>());
                trigger.value = t.value("value", "");
                trigger.token = t.value("token", (int) LLAMA_TOKEN_NULL);
                sp.grammar_triggers.push_back(trigger);
            }
        }
        if (j.contains("preserved_tokens")) {
            for (const auto & t : j.at("preserved_tokens")) {
                sp.preserved_tokens.insert(t.get<int>());
            }
        }
        sp.generation_prompt = j.value("generation_prompt", "");
        common_sampler * smpl = common_sampler_init(model, sp);
        if (!smpl) {
            throw std::runtime_error("the sampler could not be built (is the grammar valid?)");
        }
        *out = new kvt_sampler{ smpl };
    });
}

void kvt_sampler_free(kvt_sampler * sampler) {
    if (sampler) {
        common_sampler_free(sampler->smpl);
        delete sampler;
    }
}

llama_token kvt_sampler_sample(kvt_sampler * sampler, llama_context * ctx, int idx, char ** error) {
    llama_token token = LLAMA_TOKEN_NULL;
    guarded(error, [&] {
        token = common_sampler_sample(sampler->smpl, ctx, idx);
        common_sampler_accept(sampler->smpl, token, true);
    });
    return token;
}

}  // extern "C"
