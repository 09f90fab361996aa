//! Fill-in-the-middle prompts for code completion: the model's FIM template detected from its
//! vocabulary (or named with `--fim-template`), repo-level context from extra files, and a
//! plain prefix-completion fallback for models without FIM tokens.
//!
//! Assembly is done on token ids, as llama.cpp's `/infill` does: the control tokens are
//! inserted by id and the texts are tokenized without BOS, so a text that merely *looks* like
//! a control token is never mistaken for one by position.

use super::{TextError, Tokenizer};

/// The FIM conventions nextoken knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FimStyle {
    /// StarCoder / SantaCoder / StarCoder2: `<fim_prefix>`, `<fim_suffix>`, `<fim_middle>`.
    StarCoder,
    /// Qwen2.5-Coder: `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>`.
    Qwen,
    /// CodeLlama: `▁<PRE>`, `▁<SUF>`, `▁<MID>`.
    CodeLlama,
    /// DeepSeek-Coder: `<｜fim▁begin｜>` prefix `<｜fim▁hole｜>` suffix `<｜fim▁end｜>`.
    DeepSeek,
    /// Codestral: `[SUFFIX]` suffix `[PREFIX]` prefix (suffix first, no middle token).
    Codestral,
}

impl FimStyle {
    /// Every style, in detection order.
    pub const ALL: [FimStyle; 5] = [
        FimStyle::Qwen,
        FimStyle::StarCoder,
        FimStyle::CodeLlama,
        FimStyle::DeepSeek,
        FimStyle::Codestral,
    ];

    /// The name used by `--fim-template`.
    pub fn name(self) -> &'static str {
        match self {
            FimStyle::StarCoder => "starcoder",
            FimStyle::Qwen => "qwen",
            FimStyle::CodeLlama => "codellama",
            FimStyle::DeepSeek => "deepseek",
            FimStyle::Codestral => "codestral",
        }
    }

    /// `(prefix, suffix, middle)` token strings; Codestral has no middle token.
    fn tokens(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            FimStyle::StarCoder => ("<fim_prefix>", "<fim_suffix>", Some("<fim_middle>")),
            FimStyle::Qwen => ("<|fim_prefix|>", "<|fim_suffix|>", Some("<|fim_middle|>")),
            FimStyle::CodeLlama => ("▁<PRE>", "▁<SUF>", Some("▁<MID>")),
            FimStyle::DeepSeek => ("<｜fim▁begin｜>", "<｜fim▁hole｜>", Some("<｜fim▁end｜>")),
            FimStyle::Codestral => ("[PREFIX]", "[SUFFIX]", None),
        }
    }

    /// Repo-level tokens `(repo_name, file_sep)`, where the convention has them.
    fn repo_tokens(self) -> (&'static str, &'static str) {
        match self {
            FimStyle::Qwen => ("<|repo_name|>", "<|file_sep|>"),
            _ => ("<repo_name>", "<file_sep>"),
        }
    }

    /// Tokens that end a FIM completion besides EOS.
    fn end_tokens(self) -> &'static [&'static str] {
        match self {
            FimStyle::StarCoder => &["<fim_pad>", "<file_sep>", "<|endoftext|>"],
            FimStyle::Qwen => &[
                "<|fim_pad|>",
                "<|file_sep|>",
                "<|endoftext|>",
                "<|repo_name|>",
            ],
            FimStyle::CodeLlama => &["▁<EOT>", "<EOT>"],
            FimStyle::DeepSeek => &["<|EOT|>"],
            FimStyle::Codestral => &[],
        }
    }
}

/// A detected FIM template: the control token ids of one style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimTemplate {
    /// Which convention.
    pub style: FimStyle,
    prefix: u32,
    suffix: u32,
    middle: Option<u32>,
    repo_name: Option<u32>,
    file_sep: Option<u32>,
    /// Ids that end a completion (besides the model's EOS).
    pub stop_ids: Vec<u32>,
}

impl FimTemplate {
    /// The template of `style` if the vocabulary has its tokens.
    pub fn for_style(style: FimStyle, tok: &Tokenizer) -> Option<Self> {
        let (p, s, m) = style.tokens();
        let prefix = tok.token_to_id(p)?;
        let suffix = tok.token_to_id(s)?;
        let middle = match m {
            Some(m) => Some(tok.token_to_id(m)?),
            None => None,
        };
        let (repo, sep) = style.repo_tokens();
        Some(FimTemplate {
            style,
            prefix,
            suffix,
            middle,
            repo_name: tok.token_to_id(repo),
            file_sep: tok.token_to_id(sep),
            stop_ids: style
                .end_tokens()
                .iter()
                .filter_map(|t| tok.token_to_id(t))
                .collect(),
        })
    }

    /// The first style whose tokens the vocabulary has.
    pub fn detect(tok: &Tokenizer) -> Option<Self> {
        FimStyle::ALL
            .iter()
            .find_map(|&style| Self::for_style(style, tok))
    }

    /// The template named `name` (`--fim-template`): an error names the known styles, or says
    /// the vocabulary lacks the style's tokens.
    pub fn named(name: &str, tok: &Tokenizer) -> Result<Self, String> {
        let style = FimStyle::ALL
            .iter()
            .copied()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = FimStyle::ALL.iter().map(|s| s.name()).collect();
                format!("unknown FIM template `{name}`; known: {}", names.join(", "))
            })?;
        Self::for_style(style, tok).ok_or_else(|| {
            format!("the model's vocabulary has no `{name}` fill-in-the-middle tokens")
        })
    }
}

/// How a model serves fill-in-the-middle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FimMode {
    /// The model's own FIM tokens.
    Native(FimTemplate),
    /// No FIM tokens: complete the prefix (extra context in front) and cut the completion
    /// where it starts to repeat the suffix.
    PrefixOnly,
}

impl FimMode {
    /// `"fim"` or `"prefix"`, as reported in responses.
    pub fn name(&self) -> &'static str {
        match self {
            FimMode::Native(_) => "fim",
            FimMode::PrefixOnly => "prefix",
        }
    }
}

/// An extra file for repo-level context (llama.cpp's `input_extra`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    /// Its path or name.
    pub filename: String,
    /// Its text.
    pub text: String,
}

/// A FIM request's texts.
#[derive(Debug, Clone, Default)]
pub struct FimInput {
    /// Text before the cursor.
    pub prefix: String,
    /// Text after the cursor.
    pub suffix: String,
    /// Text typed at the cursor, appended to the prefix (llama.cpp's `prompt`).
    pub prompt: String,
    /// Other files.
    pub extra: Vec<ExtraFile>,
}

/// An assembled FIM prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimPrompt {
    /// Prompt ids.
    pub ids: Vec<u32>,
    /// Ids that end the completion besides the model's EOS.
    pub stop_ids: Vec<u32>,
    /// Strings that end the completion (prefix mode: the suffix's first line).
    pub stop_strings: Vec<String>,
    /// `"fim"` or `"prefix"`.
    pub mode: &'static str,
}

/// The shortest suffix line worth cutting at: shorter ones (`}`, `)`) occur everywhere.
const MIN_SUFFIX_STOP: usize = 4;

/// Builds the prompt for `input` in `mode`. Texts are tokenized without BOS; the model's BOS
/// leads when its tokenizer adds one.
pub fn build(tok: &Tokenizer, mode: &FimMode, input: &FimInput) -> Result<FimPrompt, TextError> {
    let enc = |t: &str| tok.encode(t, false);
    let mut ids = Vec::new();
    if tok.add_bos() {
        ids.extend(tok.bos_id());
    }
    match mode {
        FimMode::Native(t) => {
            // Repo-level context first (Qwen2.5-Coder / StarCoder2 layout).
            let mut extra = Vec::new();
            if let (Some(repo), Some(sep)) = (t.repo_name, t.file_sep) {
                if !input.extra.is_empty() {
                    extra.push(repo);
                    extra.extend(enc("myproject\n")?);
                    for f in &input.extra {
                        extra.push(sep);
                        extra.extend(enc(&format!("{}\n", f.filename))?);
                        extra.extend(enc(&f.text)?);
                    }
                    extra.push(sep);
                    extra.extend(enc("filename\n")?);
                }
            } else {
                for f in &input.extra {
                    extra.extend(enc(&extra_chunk(f))?);
                }
            }
            let prefix = enc(&format!("{}{}", input.prefix, input.prompt))?;
            let suffix = enc(&input.suffix)?;
            match t.style {
                FimStyle::Codestral => {
                    ids.extend(extra);
                    ids.push(t.suffix);
                    ids.extend(suffix);
                    ids.push(t.prefix);
                    ids.extend(prefix);
                }
                _ => {
                    ids.extend(extra);
                    ids.push(t.prefix);
                    ids.extend(prefix);
                    ids.push(t.suffix);
                    ids.extend(suffix);
                    ids.extend(t.middle);
                }
            }
            Ok(FimPrompt {
                ids,
                stop_ids: t.stop_ids.clone(),
                stop_strings: Vec::new(),
                mode: "fim",
            })
        }
        FimMode::PrefixOnly => {
            let mut text = String::new();
            for f in &input.extra {
                text.push_str(&extra_chunk(f));
            }
            text.push_str(&input.prefix);
            text.push_str(&input.prompt);
            ids.extend(enc(&text)?);
            Ok(FimPrompt {
                ids,
                stop_ids: Vec::new(),
                stop_strings: suffix_stop(&input.suffix).into_iter().collect(),
                mode: "prefix",
            })
        }
    }
}

/// An extra file as plain text for models without repo tokens.
fn extra_chunk(f: &ExtraFile) -> String {
    let mut s = format!("// {}\n{}", f.filename, f.text);
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s.push('\n');
    s
}

/// Where a prefix-only completion is cut: the suffix's first non-blank line, trimmed, when it
/// is long enough to be distinctive.
pub fn suffix_stop(suffix: &str) -> Option<String> {
    let line = suffix.lines().map(str::trim).find(|l| !l.is_empty())?;
    (line.chars().count() >= MIN_SUFFIX_STOP).then(|| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_stop_takes_the_first_distinctive_line() {
        assert_eq!(
            suffix_stop("\n    return x\n}\n").as_deref(),
            Some("return x")
        );
        assert_eq!(suffix_stop("}\n"), None, "too short to be distinctive");
        assert_eq!(suffix_stop("   \n"), None);
    }
}
