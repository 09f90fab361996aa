//! Thinking models' reasoning, split from their answer: the text between `<think>` and
//! `</think>` (Qwen3, QwQ, DeepSeek-R1 and its distills, SmolLM3) goes to `reasoning_content`,
//! as llama.cpp's `--reasoning-format deepseek` and vLLM's reasoning parsers return it. Works
//! on text as it streams: a tag split across deltas is held back until it is whole.

/// The tag that opens the reasoning.
pub const OPEN: &str = "<think>";
/// The tag that closes it.
pub const CLOSE: &str = "</think>";

/// One piece of generated text, split.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// Text of the reasoning.
    pub reasoning: String,
    /// Text of the answer.
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: `<think>` may still come.
    Start,
    /// Inside the reasoning; `skip_space`: nothing of it sent yet (leading whitespace dropped).
    Thinking { skip_space: bool },
    /// The answer; `skip_space`: just after `</think>` (whitespace there dropped).
    Content { skip_space: bool },
}

/// Splits one generation's text into reasoning and answer, delta by delta.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    /// Text not sent yet: a possible tag's beginning, or whitespace that may end the reasoning.
    held: String,
    /// Whether the generated text opened a reasoning (`<think>` seen).
    opened: bool,
    /// Tokens of the reasoning so far, its tags included (counted by [`Self::push_tokens`]).
    tokens: usize,
    /// Tokens pushed while it is not yet known whether the text opens a reasoning.
    undecided: usize,
}

/// Where the text ends after its trailing whitespace and its longest tail that begins `tag`
/// (both may yet turn out to be the reasoning's end).
fn safe_end(text: &str, tag: &str) -> usize {
    let partial = (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0);
    text[..text.len() - partial].trim_end().len()
}

impl ReasoningSplitter {
    /// For a generation that continues `prompt`: a prompt that already opened the reasoning
    /// (templates that end with `<think>`, as DeepSeek-R1's) starts inside it.
    pub fn new(prompt: &str) -> Self {
        let state = if prompt.trim_end().ends_with(OPEN) {
            State::Thinking { skip_space: true }
        } else {
            State::Start
        };
        ReasoningSplitter {
            state,
            held: String::new(),
            opened: false,
            tokens: 0,
            undecided: 0,
        }
    }

    /// Whether the text is inside the reasoning (at the start: the prompt opened it).
    pub fn in_reasoning(&self) -> bool {
        matches!(self.state, State::Thinking { .. })
    }

    /// The next delta of generated text, split; text that may belong to a tag is held back.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.opened = true;
                        self.state = State::Thinking { skip_space: true };
                    } else if OPEN.starts_with(t) {
                        return out;
                    } else {
                        self.state = State::Content { skip_space: false };
                    }
                }
                State::Thinking { skip_space } => {
                    if skip_space {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = t.to_string();
                        self.state = State::Thinking { skip_space: false };
                    }
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(self.held[..at].trim_end());
                        self.held = self.held[at + CLOSE.len()..].to_string();
                        self.state = State::Content { skip_space: true };
                        continue;
                    }
                    let end = safe_end(&self.held, CLOSE);
                    out.reasoning.push_str(&self.held[..end]);
                    self.held.drain(..end);
                    return out;
                }
                State::Content { skip_space } => {
                    let t = if skip_space {
                        self.held.trim_start()
                    } else {
                        &self.held
                    };
                    if !t.is_empty() {
                        out.content.push_str(t);
                        self.state = State::Content { skip_space: false };
                    }
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// [`Self::push`] of a delta that came from `tokens` tokens, counting them as reasoning
    /// when the delta opens, continues or closes it (OpenAI's `reasoning_tokens`: the tags'
    /// tokens count; the answer's do not).
    pub fn push_tokens(&mut self, text: &str, tokens: usize) -> Split {
        let before = self.state;
        let split = self.push(text);
        match (before, self.state) {
            (State::Start, State::Start) => self.undecided += tokens,
            (State::Thinking { .. }, _) | (_, State::Thinking { .. }) => {
                self.tokens += tokens + std::mem::take(&mut self.undecided);
            }
            // Opened and closed within this delta.
            (State::Start, _) if self.opened => {
                self.tokens += tokens + std::mem::take(&mut self.undecided);
            }
            _ => self.undecided = 0,
        }
        split
    }

    /// Tokens of the reasoning so far, its tags included (those given to
    /// [`Self::push_tokens`]).
    pub fn reasoning_tokens(&self) -> usize {
        self.tokens
    }

    /// The end of the generation: what was held back. An unclosed reasoning (the generation
    /// was cut short) keeps its text as reasoning; text that never opened one is the answer.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Start => Split {
                reasoning: String::new(),
                content: held,
            },
            State::Thinking { skip_space } => Split {
                reasoning: if skip_space {
                    String::new()
                } else {
                    held.trim_end().to_string()
                },
                content: String::new(),
            },
            State::Content { .. } => Split::default(),
        }
    }

    /// The whole text of a generation, split.
    pub fn split_whole(mut self, text: &str) -> Split {
        let mut out = self.push(text);
        let last = self.finish();
        out.reasoning.push_str(&last.reasoning);
        out.content.push_str(&last.content);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(prompt: &str, text: &str) -> (String, String) {
        let s = ReasoningSplitter::new(prompt).split_whole(text);
        (s.reasoning, s.content)
    }

    /// Every way of cutting `text` into two deltas gives the whole text's split, and so does
    /// one delta per character.
    fn check_streaming(prompt: &str, text: &str) {
        let whole = ReasoningSplitter::new(prompt).split_whole(text);
        let mut cuts: Vec<Vec<&str>> = text
            .char_indices()
            .map(|(i, _)| vec![&text[..i], &text[i..]])
            .collect();
        cuts.push(
            text.char_indices()
                .map(|(i, c)| &text[i..i + c.len_utf8()])
                .collect(),
        );
        for pieces in cuts {
            let mut s = ReasoningSplitter::new(prompt);
            let mut got = Split::default();
            for p in &pieces {
                let d = s.push(p);
                got.reasoning.push_str(&d.reasoning);
                got.content.push_str(&d.content);
            }
            let d = s.finish();
            got.reasoning.push_str(&d.reasoning);
            got.content.push_str(&d.content);
            assert_eq!(got, whole, "{pieces:?}");
        }
    }

    #[test]
    fn reasoning_and_answer_are_split_as_llama_cpp_does() {
        // Qwen3: the model opens the reasoning itself.
        let qwen = "<think>\nThe user greets me.\nReply.\n</think>\n\nHello!";
        assert_eq!(
            split("<|im_start|>assistant\n", qwen),
            ("The user greets me.\nReply.".into(), "Hello!".into())
        );
        // DeepSeek-R1's template opens it in the prompt.
        assert_eq!(
            split("<｜Assistant｜><think>\n", "Two and two.\n</think>\n\n4"),
            ("Two and two.".into(), "4".into())
        );
        // No reasoning at all, or an empty one (Qwen3 with `enable_thinking: false` has it
        // in the prompt, closed).
        assert_eq!(
            split("<think>\n\n</think>\n\n", "Hi <think> there"),
            (String::new(), "Hi <think> there".into())
        );
        assert_eq!(
            split("", "<think>\n\n</think>\n\nHi"),
            (String::new(), "Hi".into())
        );
        // Cut short inside the reasoning: all of it is reasoning.
        assert_eq!(
            split("", "<think>\nStill thinking </thi"),
            ("Still thinking </thi".into(), String::new())
        );
        // Text that only starts like the tag is the answer.
        assert_eq!(split("", "  <thin"), (String::new(), "  <thin".into()));
        assert_eq!(
            split("", "<b>bold</b>"),
            (String::new(), "<b>bold</b>".into())
        );
        // A second `<think>` inside the answer is text; whitespace inside is kept.
        assert_eq!(
            split("", "<think>a  b</think>x <think>y"),
            ("a  b".into(), "x <think>y".into())
        );
    }

    #[test]
    fn streamed_deltas_split_as_the_whole_text() {
        for (prompt, text) in [
            (
                "",
                "<think>\nThe user greets me.\nReply.\n</think>\n\nHello!",
            ),
            ("<think>\n", "Two and two. \n</think>\n\n4 \n"),
            ("", "  <think> é</think>  ü <think>"),
            ("", "<think>\nStill thinking </thi"),
            ("", "<thinking>no</thinking>"),
            ("", "  "),
            ("", ""),
        ] {
            check_streaming(prompt, text);
        }
    }

    /// Reasoning tokens of a generation given as (text, tokens) deltas.
    fn count(prompt: &str, deltas: &[(&str, usize)]) -> usize {
        let mut s = ReasoningSplitter::new(prompt);
        for (text, n) in deltas {
            s.push_tokens(text, *n);
        }
        s.finish();
        s.reasoning_tokens()
    }

    #[test]
    fn reasoning_tokens_are_those_up_to_the_closing_tag() {
        // Tags and reasoning count, the answer does not.
        let qwen = [
            ("<think>", 1),
            ("\n", 1),
            ("Hi", 1),
            (".", 1),
            ("</think>", 1),
        ];
        let answer = [("\n\n", 1), ("Hello", 1), ("!", 1)];
        assert_eq!(count("", &[&qwen[..], &answer[..]].concat()), 5);
        // A tag in pieces held back until whole: its pieces count once decided.
        assert_eq!(
            count(
                "",
                &[
                    ("<th", 1),
                    ("ink>", 2),
                    ("a", 1),
                    ("</think>b", 1),
                    ("c", 1)
                ]
            ),
            5
        );
        // Text that only looked like a tag, or no reasoning at all: none.
        assert_eq!(count("", &[("<th", 1), ("is", 1), (" x", 1)]), 0);
        assert_eq!(count("", &[("Hello", 1), ("<think>", 1)]), 0);
        // Opened and closed in one delta; opened by the prompt; cut short inside.
        assert_eq!(count("", &[("<think>a</think>", 3), ("b", 1)]), 3);
        assert_eq!(
            count("<think>\n", &[("a", 2), ("</think>", 1), ("b", 1)]),
            3
        );
        assert_eq!(count("", &[("<think>", 1), ("a", 1), ("</thi", 1)]), 3);
        // Whitespace before the tag waits with it.
        assert_eq!(count("", &[("\n", 1), ("<think>", 1), ("</think>", 1)]), 3);
    }
}
