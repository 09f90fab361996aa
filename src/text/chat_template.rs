//! `ChatTemplate`: renders a model's Jinja chat template (from `tokenizer_config.json` or GGUF
//! `tokenizer.chat_template`) with minijinja, with the helpers Hugging Face templates use
//! (`raise_exception`, `strftime_now`, Python string methods, `tojson`).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::TextError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Text content.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
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
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TextError::Invalid(format!("chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`ChatTemplate::render`] with more variables for the template (a request's
    /// `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`); where a name is also one of
    /// the render's own (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), the
    /// render's value is used.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TextError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Invalid(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => messages,
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
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
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

    /// Qwen3's template (namespaces, `messages[::-1]`, string methods, `is defined`) renders
    /// as transformers' `apply_chat_template` does, `enable_thinking` from the extra
    /// variables included (`tests/reference/templates/`, rendered by transformers 5.25).
    #[test]
    fn qwen3_template_renders_as_transformers_does() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/templates");
        let source = std::fs::read_to_string(dir.join("Qwen3-0.6B.jinja")).expect("template");
        let cases: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("qwen3_renders.json")).expect("renders"),
        )
        .expect("JSON");
        let t = ChatTemplate::new(&source, None, Some("<|im_end|>")).expect("compiles");
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
            let out = t.render_with(&messages, true, extra).expect("renders");
            assert_eq!(out, case["rendered"].as_str().expect("rendered"), "{name}");
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
