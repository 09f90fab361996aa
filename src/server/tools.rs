//! OpenAI tool calling (`tools`, `tool_choice`) for any model, in one of four formats
//! ([`CallFormat`]). A template that knows tools in the Hermes format (Qwen2.5, Qwen3,
//! Hermes 2/3), Llama 3.x's JSON or Mistral's `[TOOL_CALLS]` array gets the tools, calls and
//! results as they are (Mistral's with 9-character call ids, [`mistral_call_id`]), and the
//! answer is held ([`Grammar::named_calls`]) to the `<tool_call>` block (the
//! `{"name": …, "parameters": …}` object, the `[TOOL_CALLS] [{…}]` array) its model was
//! trained to write. For
//! any other template, the way llama.cpp's server serves templates that know no tools: the
//! tools are described in the system message, and the answer is constrained (JSON mode,
//! [`Grammar::tool_call`]) to `{"<function name>": {<arguments>}}` — exactly one declared
//! function with arguments that follow its `parameters` schema; earlier calls and their
//! results in `messages` are written into the conversation as prose ([`call_text`], and a
//! user turn `Result of name: …`). With `tool_choice: "auto"` the model may answer in plain
//! text instead (a first character that cannot begin a call leaves the constraint); in the
//! Hermes and Mistral formats text may also come before the calls (the grammar waits for
//! `<tool_call>` or `[TOOL_CALLS]`, [`Progress`]). A call comes back as OpenAI's `tool_calls`
//! (finish reason `tool_calls`), with any text before it as `content`. A thinking model's
//! reasoning comes first, unconstrained (`JsonConstraint::after_reasoning`).

use std::sync::Arc;

use serde_json::{json, Value};

use crate::engine::json_schema::{CallShape, Grammar};
use crate::text::chat_template::ToolSyntax;

use super::error::ApiError;

/// One declared function.
#[derive(Debug)]
struct Function {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    /// A call or plain text, as the model likes.
    Auto,
    /// A call of any of the functions.
    Required,
    /// A call of this function.
    Named(String),
}

/// How the model is told about the tools and writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// Described in the system message ([`ToolPlan::system_text`]); a call is
    /// `{"<name>": {<arguments>}}`; earlier calls and results are prose.
    Prompted,
    /// The template's own: it gets `tools` and the conversation's calls and results as they
    /// are, and the model writes `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`
    /// (templates that know tools in the Hermes format: Qwen2.5, Qwen3, Hermes 2/3).
    Hermes,
    /// The template's own, as for Hermes; the model writes `{"name": …, "parameters": {…}}`,
    /// one call per turn (Llama 3.1–3.3 with custom tools).
    Llama,
    /// The template's own, as for Hermes; the model writes
    /// `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]` (`spaced`; else without the space),
    /// its calls in one JSON array (Mistral's 'v3' and 'v3-tekken' templates).
    Mistral {
        /// A space between the tag and the array.
        spaced: bool,
    },
}

impl CallFormat {
    /// The format of a template that writes calls itself, or [`CallFormat::Prompted`].
    pub fn of_template(syntax: Option<ToolSyntax>) -> Self {
        match syntax {
            None => CallFormat::Prompted,
            Some(ToolSyntax::Hermes) => CallFormat::Hermes,
            Some(ToolSyntax::LlamaJson) => CallFormat::Llama,
            Some(ToolSyntax::MistralJson { spaced }) => CallFormat::Mistral { spaced },
        }
    }

    /// Whether one answer may make several calls (Llama's templates take one per turn).
    fn parallel(self) -> bool {
        matches!(self, CallFormat::Hermes | CallFormat::Mistral { .. })
    }

    /// Whether the template is given the tools and the calls as they are.
    pub fn is_native(self) -> bool {
        self != CallFormat::Prompted
    }

    /// How a native format's calls are written.
    fn shape(self) -> &'static CallShape {
        match self {
            CallFormat::Llama => &CallShape::LLAMA,
            CallFormat::Mistral { spaced: true } => &CallShape::MISTRAL,
            CallFormat::Mistral { spaced: false } => &CallShape::MISTRAL_TEKKEN,
            CallFormat::Hermes | CallFormat::Prompted => &CallShape::HERMES,
        }
    }

    /// A native call's opening tag (`<tool_call>`; none for Llama's bare JSON and for each of
    /// Mistral's calls, which its array holds).
    fn open_tag(self) -> &'static str {
        self.shape().open.trim()
    }

    /// A native call's closing tag.
    fn close_tag(self) -> &'static str {
        self.shape().close.trim()
    }
}

/// Where an answer written so far stands ([`ToolPlan::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Plain text, all of it and all that follows: an `"auto"` answer that did not open like
    /// a call, in a format whose calls must come first.
    Text,
    /// Plain text up to this byte; the rest may begin a call's tag (Hermes with `"auto"`:
    /// calls may follow text).
    TextUpTo(usize),
    /// Calls (or what may yet be one) from this byte on; text before it.
    CallsFrom(usize),
}

/// One call being written: its function and its arguments' span in the answer's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSpan {
    /// The function's name.
    pub name: String,
    /// Where the arguments start.
    pub start: usize,
    /// How far they can be sent.
    pub end: usize,
}

/// Most calls one Hermes or Mistral answer may make (`parallel_tool_calls`, the default;
/// Llama's templates take one).
const MAX_PARALLEL_CALLS: u32 = 8;

/// A request's tools, checked: what the model is told and what its answer is held to.
#[derive(Debug)]
pub struct ToolPlan {
    functions: Vec<Function>,
    choice: Choice,
    /// How calls are written.
    pub format: CallFormat,
    /// The request's `tools`, as the template gets them (the native formats).
    pub declared: Value,
    /// The constraint on the answer.
    pub grammar: Arc<Grammar>,
}

/// Most functions one request may declare.
const MAX_TOOLS: usize = 128;

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolPlan {
    /// From the request's `tools` and `tool_choice`, for calls in `format` (Hermes: several
    /// in one answer when `parallel`); `None` when there are no tools or `tool_choice` is
    /// `"none"`.
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        format: CallFormat,
        parallel: bool,
    ) -> Result<Option<ToolPlan>, ApiError> {
        let tools = match tools {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(t)) => t.as_slice(),
            Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
        };
        if tools.len() > MAX_TOOLS {
            return Err(ApiError::invalid(
                "tools",
                format!("at most {MAX_TOOLS} tools are supported"),
            ));
        }
        let mut functions: Vec<Function> = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let param = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    &format!("{param}.type"),
                    "only tools of type `function` are supported",
                ));
            }
            let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
                ApiError::invalid(&format!("{param}.function"), "`function` must be an object")
            })?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_name(name) {
                return Err(ApiError::invalid(
                    &format!("{param}.function.name"),
                    "a function name must be 1 to 64 letters, digits, `_` or `-`",
                ));
            }
            if functions.iter().any(|g| g.name == name) {
                return Err(ApiError::invalid(
                    &format!("{param}.function.name"),
                    format!("the function name `{name}` is declared twice"),
                ));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => None,
                Some(p) if p.is_object() => Some(p.clone()),
                Some(_) => {
                    return Err(ApiError::invalid(
                        &format!("{param}.function.parameters"),
                        "`parameters` must be a JSON schema object",
                    ))
                }
            };
            functions.push(Function {
                name: name.to_owned(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                parameters,
            });
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) if s == "none" => return Ok(None),
            Some(Value::String(s)) if s == "auto" => Choice::Auto,
            Some(Value::String(s)) if s == "required" => Choice::Required,
            Some(c) => match c.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if c.get("type").and_then(Value::as_str) == Some("function") => {
                    if !functions.iter().any(|f| f.name == n) {
                        return Err(ApiError::invalid(
                            "tool_choice",
                            format!("`tool_choice` names `{n}`, which is not in `tools`"),
                        ));
                    }
                    Choice::Named(n.to_owned())
                }
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or \
                         {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ))
                }
            },
        };
        if functions.is_empty() {
            return match tool_choice {
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` needs `tools`",
                )),
            };
        }
        let offered: Vec<(&str, Option<&Value>)> = functions
            .iter()
            .filter(|f| match &choice {
                Choice::Named(n) => f.name == *n,
                _ => true,
            })
            .map(|f| (f.name.as_str(), f.parameters.as_ref()))
            .collect();
        let auto = choice == Choice::Auto;
        let grammar = match format {
            CallFormat::Prompted => Grammar::tool_call(&offered, auto),
            CallFormat::Hermes | CallFormat::Llama | CallFormat::Mistral { .. } => {
                let parallel = parallel && format.parallel();
                let most = if parallel { MAX_PARALLEL_CALLS } else { 1 };
                Grammar::named_calls(&offered, format.shape(), auto, most)
            }
        }
        .map_err(|e| {
            let param = e.path.split('/').next().unwrap_or("tools").to_owned();
            ApiError::invalid(&param, format!("unsupported JSON schema: {e}"))
        })?;
        Ok(Some(ToolPlan {
            functions,
            choice,
            format,
            declared: Value::Array(tools.to_vec()),
            grammar: Arc::new(grammar),
        }))
    }

    /// Where an answer written so far stands: text, and where calls begin. Without
    /// `tool_choice: "auto"` it is calls from the start. With `"auto"`: in the prompted and
    /// Llama formats an answer whose first character cannot begin a call — anything but `{`
    /// (Llama: `{` first, no space before it) — is text to its end (the grammar lets it go
    /// then); in the Hermes and Mistral formats calls may follow text, from the first
    /// `<tool_call>` (`[TOOL_CALLS]`) on (the grammar is lazy: free text until that tag, as
    /// llama.cpp's lazy grammars and vLLM's Hermes and Mistral parsers take them), and text
    /// that ends with the tag's beginning holds that back.
    pub fn progress(&self, text: &str) -> Progress {
        if self.choice != Choice::Auto {
            return Progress::CallsFrom(0);
        }
        match self.format {
            CallFormat::Prompted if text.trim_start().chars().next().is_some_and(|c| c != '{') => {
                Progress::Text
            }
            CallFormat::Llama if !text.is_empty() && !text.starts_with('{') => Progress::Text,
            CallFormat::Prompted | CallFormat::Llama => Progress::CallsFrom(0),
            CallFormat::Hermes | CallFormat::Mistral { .. } => {
                let tag = self.format.shape().trigger;
                if let Some(at) = text.find(tag) {
                    return Progress::CallsFrom(at);
                }
                let partial = (1..tag.len())
                    .rev()
                    .find(|&n| text.ends_with(&tag[..n]))
                    .unwrap_or(0);
                Progress::TextUpTo(text.len() - partial)
            }
        }
    }

    /// The text of a finished answer before its calls (empty when it opens with them).
    pub fn text_before_calls<'a>(&self, text: &'a str) -> &'a str {
        match self.progress(text) {
            Progress::CallsFrom(at) => &text[..at],
            _ => "",
        }
    }

    /// The function a call names and where its arguments start (after the `:` and any
    /// whitespace), once the text has got that far: `{ "name" :` (Hermes:
    /// `<tool_call>\n{"name": "…", "arguments":`; Llama: `{"name": "…", "parameters":`;
    /// Mistral: one element of its array, `{"name": "…", "arguments":`).
    fn call_head(&self, text: &str) -> Option<(String, usize)> {
        match self.format {
            CallFormat::Prompted => call_head(text),
            CallFormat::Hermes | CallFormat::Llama | CallFormat::Mistral { .. } => {
                let rest = text.strip_prefix(self.format.open_tag())?.trim_start();
                let rest = rest.strip_prefix('{')?.trim_start();
                let rest = rest.strip_prefix("\"name\"")?.trim_start();
                let rest = rest.strip_prefix(':')?.trim_start();
                let rest = rest.strip_prefix('"')?;
                let (name, after) = rest.split_once('"')?;
                let after = after.trim_start().strip_prefix(',')?.trim_start();
                let key = json!(self.format.shape().arguments_key).to_string();
                let after = after.strip_prefix(key.as_str())?.trim_start();
                let value = after.strip_prefix(':')?.trim_start();
                if value.is_empty() {
                    return None;
                }
                Some((name.to_owned(), text.len() - value.len()))
            }
        }
    }

    /// How much of a call's arguments (from `start`) can be sent: all but a trailing run of
    /// `}` and whitespace (Hermes: and of the closing tag, or its beginning), which may hold
    /// the call object's own `}` — or, once the text is `last`, up to that `}`.
    fn args_end(&self, text: &str, start: usize, last: bool) -> usize {
        if self.format == CallFormat::Prompted {
            return args_end(text, start, last);
        }
        let (open, close) = (self.format.open_tag(), self.format.close_tag());
        if last {
            if let Some(t) = text.trim_end().strip_suffix(close) {
                return args_end(t, start, true);
            }
        }
        // Unclosed (or cut short): the tail may be the call's end, or the next call's start.
        let mut t = text;
        loop {
            let before = t.len();
            t = t.trim_end_matches(|c: char| c == '}' || c.is_ascii_whitespace());
            for tag in [close, open] {
                if let Some(n) = (1..=tag.len()).rev().find(|&n| t.ends_with(&tag[..n])) {
                    t = &t[..t.len() - n];
                }
            }
            if t.len() == before {
                return t.len().max(start);
            }
        }
    }

    /// What the system message says about the tools.
    pub fn system_text(&self) -> String {
        let mut out = String::from(
            "You can call functions. The functions, with their arguments as JSON Schema:\n",
        );
        for f in &self.functions {
            let mut d = json!({"name": f.name});
            if let Some(desc) = &f.description {
                d["description"] = json!(desc);
            }
            d["parameters"] = f
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            out.push_str(&d.to_string());
            out.push('\n');
        }
        let example = match &self.choice {
            Choice::Named(n) => n.as_str(),
            _ => self.functions[0].name.as_str(),
        };
        out.push_str(&format!(
            "To call a function, reply with only a JSON object whose one key is the function's \
             name and whose value holds its arguments, like {{\"{example}\": {{…}}}}."
        ));
        out.push_str(match &self.choice {
            Choice::Auto => " If no function fits, reply in plain text.",
            Choice::Required => " Reply with a function call.",
            Choice::Named(_) => " Reply with a call of that function.",
        });
        out
    }

    /// The calls of a finished answer, in order: each one's name and arguments as the model
    /// wrote them (JSON text, what streaming sends piece by piece); `None` for plain text (or
    /// a call cut short).
    pub fn parse_calls(&self, text: &str) -> Option<Vec<(String, String)>> {
        let Progress::CallsFrom(at) = self.progress(text) else {
            return None;
        };
        if matches!(self.format, CallFormat::Mistral { .. })
            && !mistral_closed(&text[at..], self.format.shape().trigger)
        {
            return None;
        }
        self.blocks(text[at..].trim())
            .into_iter()
            .map(|(_, block, _)| self.parse_call(block))
            .collect()
    }

    /// The calls of a finished answer as far as they were written: the whole calls, parsed
    /// (`true`); or, a call cut short (by `max_tokens` or a stop string), each call whose name
    /// was written with its arguments as far as they go — what streaming sent (`false`; OpenAI
    /// returns such calls with `finish_reason: "length"`). `None` for plain text.
    pub fn finished_calls(&self, text: &str) -> Option<(Vec<(String, String)>, bool)> {
        if let Some(calls) = self.parse_calls(text) {
            return Some((calls, true));
        }
        let Progress::CallsFrom(at) = self.progress(text) else {
            return None;
        };
        let rest = &text[at..];
        let calls: Vec<(String, String)> = self
            .calls_so_far(rest, true)
            .into_iter()
            .map(|s| (s.name, rest[s.start..s.end].to_owned()))
            .collect();
        (!calls.is_empty()).then_some((calls, false))
    }

    /// The calls written so far (`last`: the text is complete), in order: each one's name,
    /// where its arguments start and how far they can be sent (all but a tail that may be the
    /// call's own end or the next call's start; a call that another follows is complete).
    pub fn calls_so_far(&self, text: &str, last: bool) -> Vec<CallSpan> {
        let mut out = Vec::new();
        for (at, block, followed) in self.blocks(text) {
            let Some((name, start)) = self.call_head(block) else {
                break;
            };
            let end = self.args_end(block, start, last || followed);
            out.push(CallSpan {
                name,
                start: at + start,
                end: at + end,
            });
        }
        out
    }

    /// The answer cut where each call begins (Hermes: at each `<tool_call>`): each piece's
    /// offset, text, and whether another follows it (Mistral: each element of its array
    /// as far as it goes, and whether it is complete).
    fn blocks<'a>(&self, text: &'a str) -> Vec<(usize, &'a str, bool)> {
        if let CallFormat::Mistral { .. } = self.format {
            return mistral_elements(text, self.format.shape().trigger);
        }
        let open = self.format.open_tag();
        let starts: Vec<usize> = match self.format {
            CallFormat::Hermes if text.starts_with(open) => {
                text.match_indices(open).map(|(i, _)| i).collect()
            }
            _ => vec![0],
        };
        starts
            .iter()
            .enumerate()
            .map(|(k, &at)| {
                let end = starts.get(k + 1).copied().unwrap_or(text.len());
                (at, &text[at..end], k + 1 < starts.len())
            })
            .collect()
    }

    /// One call (`{"name": {arguments}}`, one Hermes block or one Llama object): its name
    /// and arguments.
    fn parse_call(&self, text: &str) -> Option<(String, String)> {
        let (name, start) = self.call_head(text)?;
        let mut body = text.trim_end();
        if self.format.is_native() {
            body = body.strip_suffix(self.format.close_tag())?.trim_end();
        }
        let end = body.strip_suffix('}')?.len();
        let args = text.get(start..end)?.trim();
        let v: Value = serde_json::from_str(args).ok()?;
        if !v.is_object() || !self.functions.iter().any(|f| f.name == name) {
            return None;
        }
        Some((name, args.to_owned()))
    }
}

/// The calls of a Mistral answer (`[TOOL_CALLS] [{…}, {…}]`, from its tag on): each element's
/// offset and text (from its `{` to its matching `}`, or to the end of the text while it is
/// being written) and whether it is complete. Elements are found by following the JSON's
/// strings and nesting, so a `{"name"` inside the arguments does not start a call.
fn mistral_elements<'a>(text: &'a str, tag: &str) -> Vec<(usize, &'a str, bool)> {
    let mut out = Vec::new();
    let Some(rest) = text.strip_prefix(tag) else {
        return out;
    };
    let Some(array) = rest.trim_start().strip_prefix('[') else {
        return out;
    };
    let mut at = text.len() - array.len();
    loop {
        let element = text[at..].trim_start();
        at = text.len() - element.len();
        if !element.starts_with('{') {
            return out;
        }
        let Some(len) = json_value_len(element) else {
            out.push((at, element, false));
            return out;
        };
        out.push((at, &element[..len], true));
        let after = element[len..].trim_start();
        match after.strip_prefix(',') {
            Some(next) => at = text.len() - next.len(),
            None => return out,
        }
    }
}

/// Whether a Mistral answer's array (from its tag on) is closed: complete elements, then `]`
/// and nothing but whitespace.
fn mistral_closed(text: &str, tag: &str) -> bool {
    let text = text.trim_end();
    let elements = mistral_elements(text, tag);
    match elements.last() {
        Some(&(at, element, true)) => text[at + element.len()..].trim() == "]",
        _ => false,
    }
}

/// The length of the JSON object or array `text` begins with, once its closing bracket is
/// written (strings and escapes followed, so brackets inside strings do not count).
fn json_value_len(text: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in text.bytes().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// A call id as Mistral's templates take it: 9 letters and digits (they refuse any other).
/// An id that is one already stays; a longer one ending in 9 letters and digits keeps those
/// (OpenAI-style `call_…` ids, as vLLM cuts them); any other is replaced by 9 letters and
/// digits of its hash — the same for the call and for the result that answers it.
pub fn mistral_call_id(id: &str) -> String {
    let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    if id.len() >= 9 && id.is_char_boundary(id.len() - 9) && alnum(&id[id.len() - 9..]) {
        return id[id.len() - 9..].to_owned();
    }
    // FNV-1a: stable across runs and builds, as a conversation sent again must render alike.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..9)
        .map(|_| {
            let d = DIGITS[(h % 62) as usize] as char;
            h /= 62;
            d
        })
        .collect()
}

/// How much of a `{"name": {arguments}}` call's arguments (from `start`) can be sent: all but
/// a trailing run of `}` and whitespace, which may hold the call object's own `}` — or, once
/// the text is `last`, up to that `}`.
fn args_end(text: &str, start: usize, last: bool) -> usize {
    let end = if last {
        let t = text.trim_end();
        t.strip_suffix('}').unwrap_or(t).trim_end().len()
    } else {
        text.trim_end_matches(|c: char| c == '}' || c.is_ascii_whitespace())
            .len()
    };
    end.max(start)
}

/// The function a `{"name": {arguments}}` call names and where its arguments start (after the
/// `:` and any whitespace), once the text has got that far: `{ "name" :`.
fn call_head(text: &str) -> Option<(String, usize)> {
    let rest = text.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    // Function names are letters, digits, `_` and `-`: no escapes, no `:` inside.
    let (name, after) = rest.split_once('"')?;
    let after = after.trim_start().strip_prefix(':')?;
    let value = after.trim_start();
    if value.is_empty() {
        return None;
    }
    Some((name.to_owned(), text.len() - value.len()))
}

/// An earlier call as the conversation shows it to the model: `Calling name({arguments}).`
/// — in prose rather than in the call format, which a small model otherwise copies into its
/// answer after the result (seen with SmolLM2: the result echoed as another "call").
pub fn call_text(name: &str, arguments: &str) -> String {
    let args = serde_json::from_str::<Value>(arguments)
        .map_or_else(|_| arguments.to_owned(), |v| v.to_string());
    format!("Calling {name}({args}).")
}

/// A call as OpenAI's `tool_calls` entry.
pub fn wire_call(name: &str, arguments: &str) -> Value {
    let id = format!("call_{:024x}", rand::random::<u128>() >> 32);
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(format: CallFormat, choice: &str) -> ToolPlan {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        ToolPlan::from_request(Some(&tools), Some(&json!(choice)), format, true)
            .expect("valid")
            .expect("a plan")
    }

    /// Calls streamed a character at a time send their arguments in pieces that add up to
    /// each whole call's, never a closing `}` or tag or the next call's opening; in every
    /// format, one call and (Hermes) several.
    #[test]
    fn streamed_arguments_add_up_to_the_whole_calls() {
        let hermes = |city: &str| {
            format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>")
        };
        let mistral = |city: &str| {
            format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}")
        };
        for (format, text) in [
            (CallFormat::Hermes, hermes("Paris}")),
            (
                CallFormat::Hermes,
                format!("{}\n{}", hermes("Paris}"), hermes("<Rome>")),
            ),
            (
                CallFormat::Prompted,
                "{\"get_weather\": {\"city\": \"Paris}\"}}".to_owned(),
            ),
            (
                CallFormat::Llama,
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris}\"}}".to_owned(),
            ),
            (
                CallFormat::Mistral { spaced: true },
                format!("[TOOL_CALLS] [{}]", mistral("Paris}")),
            ),
            (
                CallFormat::Mistral { spaced: false },
                format!(
                    "[TOOL_CALLS][{}, {}]",
                    mistral("Paris}"),
                    mistral("{\\\"name\\\"")
                ),
            ),
        ] {
            let p = plan(format, "required");
            let calls = p.parse_calls(&text).expect("calls");
            assert_eq!(calls[0].1, "{\"city\": \"Paris}\"}");
            let mut sent: Vec<usize> = Vec::new();
            let mut pieces = vec![String::new(); calls.len()];
            for (end, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
                let part = &text[..end];
                assert_eq!(p.progress(part), Progress::CallsFrom(0), "{part}");
                for (k, span) in p
                    .calls_so_far(part, end == text.len())
                    .into_iter()
                    .enumerate()
                {
                    assert_eq!(span.name, "get_weather");
                    if k == sent.len() {
                        sent.push(span.start);
                    }
                    if span.end > sent[k] {
                        pieces[k].push_str(&part[sent[k]..span.end]);
                        sent[k] = span.end;
                    }
                }
            }
            let whole: Vec<String> = calls.into_iter().map(|(_, a)| a).collect();
            assert_eq!(pieces, whole, "{format:?}");
        }
    }

    #[test]
    fn auto_answers_are_text_until_a_call_can_begin() {
        use Progress::{CallsFrom, Text, TextUpTo};
        // Hermes: calls may follow text; a tag's beginning at the end is held back.
        let h = plan(CallFormat::Hermes, "auto");
        for (text, progress) in [
            ("", TextUpTo(0)),
            ("<tool", TextUpTo(0)),
            ("<tool_call>\n{", CallsFrom(0)),
            ("Paris", TextUpTo(5)),
            ("Paris <b>", TextUpTo(9)),
            ("Sure. <tool_c", TextUpTo(6)),
            ("Sure.\n<tool_call>\n{", CallsFrom(6)),
        ] {
            assert_eq!(h.progress(text), progress, "{text:?}");
        }
        assert_eq!(
            plan(CallFormat::Hermes, "required").progress("Paris"),
            CallsFrom(0)
        );
        // The other formats: a call comes first or not at all.
        let p = plan(CallFormat::Prompted, "auto");
        assert_eq!(p.progress(" {"), CallsFrom(0));
        assert_eq!(p.progress("Paris {"), Text);
        let l = plan(CallFormat::Llama, "auto");
        for (text, progress) in [("", CallsFrom(0)), ("{\"name\"", CallsFrom(0))] {
            assert_eq!(l.progress(text), progress, "{text:?}");
        }
        assert_eq!(l.progress("Paris"), Text);
        assert_eq!(l.progress(" {"), Text);
        // Text, then a call: both come back.
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>";
        let answer = format!("Let me check.\n{call}");
        assert_eq!(
            h.parse_calls(&answer),
            Some(vec![("get_weather".to_owned(), "{}".to_owned())])
        );
        assert_eq!(h.text_before_calls(&answer), "Let me check.\n");
        assert_eq!(h.text_before_calls(call), "");
        assert_eq!(
            h.finished_calls(&answer),
            Some((vec![("get_weather".to_owned(), "{}".to_owned())], true))
        );
        // Cut short: the call as far as it got; before its name, text.
        let cut = "Hm.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par";
        assert_eq!(
            h.finished_calls(cut),
            Some((
                vec![("get_weather".to_owned(), "{\"city\": \"Par".to_owned())],
                false
            ))
        );
        assert_eq!(h.finished_calls("<tool_call>\n{\"na"), None);
        // Cut short or not a declared function: no call.
        assert!(h
            .parse_calls("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}")
            .is_none());
        assert!(h
            .parse_calls("<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>")
            .is_none());
        assert!(l
            .parse_calls("{\"name\": \"get_weather\", \"arguments\": {}}")
            .is_none());
        assert_eq!(
            l.parse_calls("{\"name\": \"get_weather\", \"parameters\": {}}"),
            Some(vec![("get_weather".to_owned(), "{}".to_owned())])
        );
    }

    /// Several Hermes calls in one answer: each parsed, and while streaming each one's span
    /// grows to its whole arguments once the next begins.
    #[test]
    fn parallel_hermes_calls_are_each_parsed_and_streamed() {
        let h = plan(CallFormat::Hermes, "auto");
        let call = |city: &str| {
            format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>")
        };
        let text = format!("{}\n{}", call("Paris"), call("Rome"));
        let calls = h.parse_calls(&text).expect("calls");
        let args: Vec<&str> = calls.iter().map(|(_, a)| a.as_str()).collect();
        assert_eq!(args, ["{\"city\": \"Paris\"}", "{\"city\": \"Rome\"}"]);
        // Mid-way through the second call: the first is whole, the second as far as safe.
        let cut = text.len() - "\"}}\n</tool_call>".len();
        let spans = h.calls_so_far(&text[..cut], false);
        assert_eq!(spans.len(), 2);
        assert_eq!(&text[spans[0].start..spans[0].end], args[0]);
        assert_eq!(&text[spans[1].start..spans[1].end], "{\"city\": \"Rome");
        let spans = h.calls_so_far(&text, true);
        assert_eq!(&text[spans[1].start..spans[1].end], args[1]);
        // The grammar lets the second call through only with `parallel_tool_calls`.
        let single = ToolPlan::from_request(
            Some(&json!([{"type": "function", "function": {"name": "get_weather"}}])),
            None,
            CallFormat::Hermes,
            false,
        )
        .expect("valid")
        .expect("plan");
        let follows = |p: &ToolPlan| {
            crate::engine::json_mode::JsonPaths::default()
                .after_bytes(&p.grammar, text.as_bytes())
                .is_some()
        };
        assert!(follows(&h) && !follows(&single));
        // Llama's templates take one call per turn, `parallel_tool_calls` or not.
        let llama = plan(CallFormat::Llama, "auto");
        let one = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        let two = format!("{one}; {one}");
        for (text, ok) in [(one, true), (two.as_str(), false)] {
            let after = crate::engine::json_mode::JsonPaths::default()
                .after_bytes(&llama.grammar, text.as_bytes());
            assert_eq!(after.is_some(), ok, "{text}");
        }
    }

    /// Mistral's calls, one JSON array after `[TOOL_CALLS]`: text before the tag with
    /// `"auto"` (a tag's beginning held back), each element parsed — a `{"name"` inside the
    /// arguments or a `]` inside a string does not cut them —, an array not closed is a call
    /// cut short, and while streaming each element grows to its whole arguments.
    #[test]
    fn mistral_calls_are_the_elements_of_one_array() {
        use Progress::{CallsFrom, TextUpTo};
        let m = plan(CallFormat::Mistral { spaced: true }, "auto");
        for (text, progress) in [
            ("", TextUpTo(0)),
            ("[TOOL", TextUpTo(0)),
            ("Sure. [TOOL_C", TextUpTo(6)),
            ("[TOOL_CALLS] [", CallsFrom(0)),
            ("Sure. [TOOL_CALLS] [{", CallsFrom(6)),
            ("[1, 2]", TextUpTo(6)),
        ] {
            assert_eq!(m.progress(text), progress, "{text:?}");
        }
        let first =
            r#"{"name": "get_weather", "arguments": {"city": "Paris ]", "filter": {"name": "x"}}}"#;
        let second = r#"{"name": "get_weather", "arguments": {"city": "Rome"}}"#;
        let text = format!("Let me see. [TOOL_CALLS] [{first}, {second}]");
        let want = vec![
            (
                "get_weather".to_owned(),
                r#"{"city": "Paris ]", "filter": {"name": "x"}}"#.to_owned(),
            ),
            ("get_weather".to_owned(), r#"{"city": "Rome"}"#.to_owned()),
        ];
        assert_eq!(m.parse_calls(&text), Some(want.clone()));
        assert_eq!(m.text_before_calls(&text), "Let me see. ");
        assert_eq!(m.finished_calls(&text), Some((want, true)));
        // Not closed: cut short, the calls as far as they got.
        let cut = &text[..text.len() - r#"e"}}]"#.len()];
        assert_eq!(m.parse_calls(cut), None);
        let (calls, whole) = m.finished_calls(cut).expect("calls");
        assert!(!whole);
        assert_eq!(calls[1].1, r#"{"city": "Rom"#);
        // Mid-way through the second element: the first whole, the second as far as safe.
        let at = text.find("[TOOL_CALLS]").expect("tag");
        let spans = m.calls_so_far(&cut[at..], false);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            &cut[at + spans[0].start..at + spans[0].end],
            r#"{"city": "Paris ]", "filter": {"name": "x"}}"#
        );
        // Anything after the array, or a function not declared: no calls.
        assert_eq!(m.parse_calls(&format!("{text} more")), None);
        assert_eq!(
            m.parse_calls(r#"[TOOL_CALLS] [{"name": "other", "arguments": {}}]"#),
            None
        );
        // Without the space ('v3-tekken'), the same.
        let t = plan(CallFormat::Mistral { spaced: false }, "required");
        assert_eq!(
            t.parse_calls(&format!("[TOOL_CALLS][{second}]")),
            Some(vec![(
                "get_weather".to_owned(),
                r#"{"city": "Rome"}"#.to_owned()
            )])
        );
    }

    /// Mistral's templates refuse call ids that are not 9 letters and digits: such ids stay,
    /// longer ones keep their last 9 when those are letters and digits, any other becomes 9
    /// of its hash — the same each time, different for different ids.
    #[test]
    fn call_ids_become_what_mistral_templates_take() {
        assert_eq!(mistral_call_id("a1B2c3D4e"), "a1B2c3D4e");
        assert_eq!(
            mistral_call_id("call_0123456789abcdef01234567"),
            "abcdef01234567"[5..]
        );
        for id in ["call_1", "call_2", "x-y", "", "call_ééééééééé"] {
            let m = mistral_call_id(id);
            assert_eq!(m.len(), 9, "{id}");
            assert!(m.bytes().all(|b| b.is_ascii_alphanumeric()), "{m}");
            assert_eq!(m, mistral_call_id(id));
        }
        assert_ne!(mistral_call_id("call_1"), mistral_call_id("call_2"));
    }
}
