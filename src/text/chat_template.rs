//! `ChatTemplate`: renders a model's Jinja chat template (from `tokenizer_config.json` or GGUF
//! `tokenizer.chat_template`) with minijinja, with the helpers Hugging Face templates use
//! (`raise_exception`, `strftime_now`, Python string methods, `tojson`).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::TextError;

/// One message of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text content.
    pub content: String,
    /// An assistant's calls, for templates that write them (OpenAI's shape, `arguments` an
    /// object: `{"type": "function", "function": {"name", "arguments"}}`); absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message's call id; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` message's function name; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message of text.
    pub fn text(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
            ..Default::default()
        }
    }
}

/// How a template that knows tools writes a call (what its model was trained to write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` (Qwen2.5, Qwen3, Hermes 2/3).
    Hermes,
    /// `{"name": …, "parameters": …}`, one call per turn, results in `ipython` turns (Llama
    /// 3.1–3.3 with custom tools).
    LlamaJson,
    /// `[TOOL_CALLS] [{"name": …, "arguments": …}, …]`, one JSON array of calls after the tag
    /// (`spaced`: a space before the array, as Mistral's 'v3' templates write it; none in
    /// 'v3-tekken' and later), results in `[TOOL_RESULTS]`, 9-character call ids (Mistral 7B
    /// v0.3, Nemo, Large 2407, Small 3.x).
    MistralJson {
        /// Whether the template writes `[TOOL_CALLS] [` (else `[TOOL_CALLS][`).
        spaced: bool,
    },
}

impl ToolSyntax {
    /// From the template's source: Hermes templates write `<tool_call>` blocks; Llama 3.x
    /// templates tell the model the format in words that name `"parameters"`; Mistral's write
    /// `[TOOL_CALLS]` before a JSON array (not the `[TOOL_CALLS]name[ARGS]{…}` of its newest
    /// templates, which is not served natively).
    fn of_source(source: &str) -> Option<Self> {
        if !source.contains("tools") {
            None
        } else if source.contains("<tool_call>") {
            Some(ToolSyntax::Hermes)
        } else if source.contains("[TOOL_CALLS]") && !source.contains("[ARGS]") {
            Some(ToolSyntax::MistralJson {
                spaced: source.contains("[TOOL_CALLS] ["),
            })
        } else if source.contains(r#""parameters": dictionary of argument name"#)
            && source.contains("tool_calls")
        {
            Some(ToolSyntax::LlamaJson)
        } else {
            None
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How it writes tool calls itself, if it does.
    tool_syntax: Option<ToolSyntax>,
    /// The Jinja source.
    source: String,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// JSON text as Python's `json.dumps` writes it — transformers' `tojson` (keys in their
/// order, `", "` and `": "` between items, non-ASCII as is; `indent`, `separators`,
/// `sort_keys`, `ensure_ascii` as keyword arguments): tool schemas reach the model in the
/// bytes it was trained on (minijinja's own sorts keys and writes no spaces).
fn tojson(
    value: &minijinja::Value,
    indent: Option<minijinja::Value>,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, Error> {
    let bad = |m: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {m}"));
    let json = serde_json::to_value(value).map_err(|e| bad(&e.to_string()))?;
    let indent = match indent.or(kwargs.get::<Option<minijinja::Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_usize() {
            Some(n) => Some(" ".repeat(n)),
            None => Some(v.as_str().ok_or_else(|| bad("indent"))?.to_owned()),
        },
    };
    let (item, key) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(p) if p.len() == 2 => (p[0].clone(), p[1].clone()),
        Some(_) => return Err(bad("separators must be two strings")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let sort = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(
        &json,
        &Style {
            indent,
            item,
            key,
            sort,
            ascii,
        },
        0,
        &mut out,
    );
    Ok(out)
}

/// How [`tojson`] writes.
struct Style {
    indent: Option<String>,
    item: String,
    key: String,
    sort: bool,
    ascii: bool,
}

fn write_json(v: &serde_json::Value, st: &Style, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let string = |t: &str, out: &mut String| {
        let quoted = J::String(t.to_owned()).to_string();
        if !st.ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    };
    // Before an item: a new line at the depth's indent, or nothing.
    let newline = |depth: usize, out: &mut String| {
        if let Some(ind) = &st.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item);
                }
                newline(depth + 1, out);
                write_json(x, st, depth + 1, out);
            }
            newline(depth, out);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &J)> = map.iter().collect();
            if st.sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item);
                }
                newline(depth + 1, out);
                string(k, out);
                out.push_str(&st.key);
                write_json(x, st, depth + 1, out);
            }
            newline(depth, out);
            out.push('}');
        }
        J::String(t) => string(t, out),
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    /// Compiles `source`; BOS/EOS texts are passed to the template as `bos_token`/`eos_token`.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TextError::Invalid(format!("chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            tool_syntax: ToolSyntax::of_source(source),
            source: source.to_owned(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS and EOS texts the template is given.
    pub fn special_tokens(&self) -> (&str, &str) {
        (&self.bos_token, &self.eos_token)
    }

    /// How the template describes `tools` and writes calls itself, which its model was
    /// trained to answer in; `None` for a template that knows no tools.
    pub fn tool_syntax(&self) -> Option<ToolSyntax> {
        self.tool_syntax
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_with(
            messages,
            add_generation_prompt,
            None,
            &serde_json::Map::new(),
        )
    }

    /// [`ChatTemplate::render`] with the request's `tools` (OpenAI's list, for templates that
    /// describe them) and more variables for the template (a request's
    /// `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); where a name is also one of
    /// the render's own (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
    /// `eos_token`), the render's value is used.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TextError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Invalid(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                ..minijinja::Value::from_serialize(extra)
            })
            .map_err(|e| TextError::Invalid(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    #[test]
    fn renders_chatml_with_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            None,
        )
        .expect("compiles");
        let out = t.render(&[msg("user", " hi ")], true).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Qwen3's template and the renders transformers made of it (`tests/reference/templates/`).
    /// A template of `tests/reference/templates/` and the renders of `renders` there.
    fn fixture(
        template: &str,
        renders: &str,
        bos: Option<&str>,
        eos: &str,
    ) -> (ChatTemplate, serde_json::Value) {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/templates");
        let source = std::fs::read_to_string(dir.join(template)).expect("template");
        let cases =
            serde_json::from_str(&std::fs::read_to_string(dir.join(renders)).expect("renders"))
                .expect("JSON");
        let t = ChatTemplate::new(&source, bos, Some(eos)).expect("compiles");
        (t, cases)
    }

    fn qwen3_fixture(renders: &str) -> (ChatTemplate, serde_json::Value) {
        fixture("Qwen3-0.6B.jinja", renders, None, "<|im_end|>")
    }

    /// A fixture case's messages, with their calls and call ids.
    fn tool_messages(case: &serde_json::Value) -> Vec<ChatMessage> {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage {
                role: text(&m["role"]).expect("role"),
                content: text(&m["content"]).expect("content"),
                tool_calls: m["tool_calls"].as_array().cloned(),
                tool_call_id: text(&m["tool_call_id"]),
                name: text(&m["name"]),
            })
            .collect()
    }

    /// Qwen3's template (namespaces, `messages[::-1]`, string methods, `is defined`) renders
    /// as transformers' `apply_chat_template` does, `enable_thinking` from the extra
    /// variables included (`tests/reference/templates/`, rendered by transformers 5.25).
    #[test]
    fn qwen3_template_renders_as_transformers_does() {
        let (t, cases) = qwen3_fixture("qwen3_renders.json");
        let cases = cases.as_object().expect("cases");
        assert_eq!(cases.len(), 4);
        for (name, case) in cases {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    msg(
                        m["role"].as_str().expect("role"),
                        m["content"].as_str().expect("content"),
                    )
                })
                .collect();
            let extra = case["kwargs"].as_object().expect("kwargs");
            let out = t
                .render_with(&messages, true, None, extra)
                .expect("renders");
            assert_eq!(out, case["rendered"].as_str().expect("rendered"), "{name}");
        }
    }

    /// Qwen3's template given tools, earlier calls (arguments as an object and as JSON text)
    /// and their results renders as transformers' `apply_chat_template` does
    /// (`scripts/qwen3-tool-renders.py`): the tools as JSON in its system prompt, calls as
    /// `<tool_call>` blocks, results as `<tool_response>` blocks.
    #[test]
    fn qwen3_template_renders_tools_and_calls_as_transformers_does() {
        let (t, cases) = qwen3_fixture("qwen3_tool_renders.json");
        assert_eq!(t.tool_syntax(), Some(ToolSyntax::Hermes));
        assert_tool_renders(&t, &cases);
    }

    /// Each of a fixture's four conversations (with its `kwargs`, if any) renders as
    /// transformers rendered it.
    fn assert_tool_renders(t: &ChatTemplate, cases: &serde_json::Value) {
        let cases = cases.as_object().expect("cases");
        assert_eq!(cases.len(), 4);
        for (name, case) in cases {
            let extra = case["kwargs"].as_object().cloned().unwrap_or_default();
            let out = t
                .render_with(&tool_messages(case), true, Some(&case["tools"]), &extra)
                .expect("renders");
            assert_eq!(out, case["rendered"].as_str().expect("rendered"), "{name}");
        }
    }

    /// Llama 3.2's template with tools renders as transformers' `apply_chat_template` does
    /// (`scripts/tool-renders.py llama3.2`): the tools as indented JSON in the first user
    /// turn, calls as `{"name": …, "parameters": …}`, results as `ipython` turns (a string
    /// result as a JSON string: the template's `is iterable` holds for strings).
    #[test]
    fn llama32_template_renders_tools_and_calls_as_transformers_does() {
        let (t, cases) = fixture(
            "Llama-3.2-3B-Instruct.jinja",
            "llama32_tool_renders.json",
            Some("<|begin_of_text|>"),
            "<|eot_id|>",
        );
        assert_eq!(t.tool_syntax(), Some(ToolSyntax::LlamaJson));
        assert!(cases
            .as_object()
            .expect("cases")
            .values()
            .all(|c| c["kwargs"].is_object()));
        assert_tool_renders(&t, &cases);
        // A template that knows no tools.
        let plain = ChatTemplate::new("{{ messages[0]['content'] }}", None, None).expect("ok");
        assert_eq!(plain.tool_syntax(), None);
    }

    /// Mistral's 'v3' (Mistral 7B v0.3, Large 2407) and 'v3-tekken' (Nemo) templates with
    /// tools render as transformers' `apply_chat_template` does (`scripts/tool-renders.py
    /// mistral` / `mistral-nemo`): the tools as `[AVAILABLE_TOOLS]` before the last user
    /// turn, several calls in one `[TOOL_CALLS]` array with their 9-character ids, results as
    /// `[TOOL_RESULTS]`, a system message in the last user turn.
    #[test]
    fn mistral_templates_render_tools_and_calls_as_transformers_does() {
        for (template, renders, spaced) in [
            ("Mistral-v3.jinja", "mistral_tool_renders.json", true),
            (
                "Mistral-Nemo-v3-tekken.jinja",
                "mistral_nemo_tool_renders.json",
                false,
            ),
        ] {
            let (t, cases) = fixture(template, renders, Some("<s>"), "</s>");
            assert_eq!(t.tool_syntax(), Some(ToolSyntax::MistralJson { spaced }));
            assert_tool_renders(&t, &cases);
        }
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            None,
            None,
        )
        .expect("compiles");
        let err = t
            .render(&[msg("assistant", "x")], false)
            .expect_err("fails");
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(t.render(&[msg("user", "x")], false).expect("ok"), "ok");
    }
}
