//! JSON mode (`response_format: {"type": "json_object"}`): a byte-level JSON recogniser that
//! says, before each token is sampled, which tokens keep the text a prefix of one JSON object,
//! and when the object is complete (then only a stop token may follow).
//!
//! Tokens are judged by their bytes ([`TokenBytes`], plain data the tokenizer's side builds:
//! `text::Tokenizer::token_bytes`); tokens without bytes (special tokens, parts of a
//! multi-byte character) are never allowed inside the JSON. The allowed set of each state is
//! computed by trying every token's bytes (milliseconds) and remembered by the engine core
//! (`EngineCore`'s memo), as generation keeps returning to the same few states.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Deepest nesting of objects and arrays (one bit each in [`JsonState`]'s stack).
const MAX_DEPTH: u8 = 64;
/// Longest run of whitespace between tokens of the JSON (a model can otherwise emit
/// newlines forever while staying valid).
const MAX_SPACE_RUN: u8 = 32;

/// Each token id's text as bytes (`None`: never allowed in JSON), with an id that names the
/// table in the engine's memo of allowed sets.
pub struct TokenBytes {
    id: u64,
    bytes: Vec<Option<Box<[u8]>>>,
}

impl std::fmt::Debug for TokenBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenBytes({} tokens)", self.bytes.len())
    }
}

impl TokenBytes {
    /// A table of each id's bytes (`text::Tokenizer::token_bytes`).
    pub fn new(bytes: Vec<Option<Box<[u8]>>>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TokenBytes {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            bytes,
        }
    }

    /// A table from explicit texts (tests).
    pub fn from_texts(texts: &[Option<&str>]) -> Self {
        Self::new(
            texts
                .iter()
                .map(|t| t.map(|s| s.as_bytes().into()))
                .collect(),
        )
    }

    /// Bit `id` set for every token whose bytes `state` accepts.
    pub fn allowed(&self, state: JsonState) -> Vec<u64> {
        let mut set = vec![0u64; self.bytes.len().div_ceil(64)];
        for (id, b) in self.bytes.iter().enumerate() {
            if b.as_deref().is_some_and(|b| state.after_bytes(b).is_some()) {
                set[id / 64] |= 1 << (id % 64);
            }
        }
        set
    }
}

/// Where the recogniser is within the JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    /// Before the top-level value (only `{` or whitespace).
    Start,
    /// A value must come (after `:`, `,` in an array, or `[` when `close` allows `]`).
    Value { close: bool },
    /// After `{` (`close`: `}` allowed) or `,` in an object: a key must come.
    Key { close: bool },
    /// Inside a string; `key` when it is an object key.
    Str { key: bool, esc: Esc },
    /// After a key: `:` must come.
    Colon,
    /// Inside a number.
    Num(Num),
    /// Inside `true`, `false` or `null`: the literal and how much of it is done.
    Lit { word: &'static [u8], at: u8 },
    /// After a value: `,` or the closing bracket of the enclosing container.
    After,
    /// The top-level object is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Esc {
    None,
    Backslash,
    /// Hex digits still due after `\u`.
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

/// The recogniser's state: small and `Copy`, so every candidate token is tried on a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsonState {
    mode: Mode,
    /// Enclosing containers, innermost in bit `depth - 1`: 1 = object, 0 = array.
    stack: u64,
    depth: u8,
    /// Whitespace bytes in a row outside strings.
    space_run: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState {
            mode: Mode::Start,
            stack: 0,
            depth: 0,
            space_run: 0,
        }
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonState {
    /// Whether the top-level object is complete.
    pub fn is_done(&self) -> bool {
        self.mode == Mode::Done
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && (self.stack >> (self.depth - 1)) & 1 == 1
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        self.stack = (self.stack & !(1 << self.depth)) | (u64::from(object) << self.depth);
        self.depth += 1;
        self.mode = if object {
            Mode::Key { close: true }
        } else {
            Mode::Value { close: true }
        };
        true
    }

    /// A closing bracket: right kind for the innermost container.
    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.in_object() != object {
            return false;
        }
        self.depth -= 1;
        // Bits above the depth stay clear: equal states compare (and memoise) equal.
        self.stack &= !(1 << self.depth);
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        };
        true
    }

    /// A value's first byte (`close`: `]` may end an empty array instead).
    fn value(&mut self, b: u8, close: bool) -> bool {
        self.mode = match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b']' if close => return self.close(false),
            b'"' => Mode::Str {
                key: false,
                esc: Esc::None,
            },
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int),
            b't' => Mode::Lit {
                word: b"true",
                at: 1,
            },
            b'f' => Mode::Lit {
                word: b"false",
                at: 1,
            },
            b'n' => Mode::Lit {
                word: b"null",
                at: 1,
            },
            _ => return false,
        };
        true
    }

    /// After a value: `,`, a closing bracket, or whitespace.
    fn after(&mut self, b: u8) -> bool {
        match b {
            b',' if self.in_object() => self.mode = Mode::Key { close: false },
            b',' if self.depth > 0 => self.mode = Mode::Value { close: false },
            b'}' => return self.close(true),
            b']' => return self.close(false),
            _ => return false,
        }
        true
    }

    /// Feeds one byte; `false` if the text can no longer be a prefix of a JSON object.
    pub fn push(&mut self, b: u8) -> bool {
        let outside_string = !matches!(self.mode, Mode::Str { .. });
        if outside_string && is_space(b) && !matches!(self.mode, Mode::Num(_) | Mode::Lit { .. }) {
            if self.mode == Mode::Done || self.space_run >= MAX_SPACE_RUN {
                return false;
            }
            self.space_run += 1;
            return true;
        }
        self.space_run = 0;
        match self.mode {
            Mode::Start => b == b'{' && self.open(true),
            Mode::Value { close } => self.value(b, close),
            Mode::Key { close } => match b {
                b'"' => {
                    self.mode = Mode::Str {
                        key: true,
                        esc: Esc::None,
                    };
                    true
                }
                b'}' if close => self.close(true),
                _ => false,
            },
            Mode::Str { key, esc } => {
                let esc = match esc {
                    Esc::None => match b {
                        b'"' => {
                            self.mode = if key { Mode::Colon } else { Mode::After };
                            return true;
                        }
                        b'\\' => Esc::Backslash,
                        0..=0x1F => return false,
                        _ => Esc::None,
                    },
                    Esc::Backslash => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Esc::None,
                        b'u' => Esc::Hex(4),
                        _ => return false,
                    },
                    Esc::Hex(n) => {
                        if !b.is_ascii_hexdigit() {
                            return false;
                        }
                        if n > 1 {
                            Esc::Hex(n - 1)
                        } else {
                            Esc::None
                        }
                    }
                };
                self.mode = Mode::Str { key, esc };
                true
            }
            Mode::Colon => {
                if b == b':' {
                    self.mode = Mode::Value { close: false };
                }
                b == b':'
            }
            Mode::Num(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Num::Zero,
                    (Num::Minus, b'1'..=b'9') => Num::Int,
                    (Num::Int, b'0'..=b'9') => Num::Int,
                    (Num::Zero | Num::Int, b'.') => Num::Dot,
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
                    (Num::E, b'+' | b'-') => Num::ESign,
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
                    // The number ends at its first byte that cannot continue it.
                    _ if n.complete() => {
                        self.mode = Mode::After;
                        return if is_space(b) {
                            self.space_run = 1;
                            true
                        } else {
                            self.after(b)
                        };
                    }
                    _ => return false,
                };
                self.mode = Mode::Num(next);
                true
            }
            Mode::Lit { word, at } => {
                if word.get(usize::from(at)) != Some(&b) {
                    return false;
                }
                self.mode = if usize::from(at) + 1 == word.len() {
                    Mode::After
                } else {
                    Mode::Lit { word, at: at + 1 }
                };
                true
            }
            Mode::After => self.after(b),
            Mode::Done => false,
        }
    }

    /// The state after `bytes`, if they keep the text a prefix of a JSON object.
    pub fn after_bytes(mut self, bytes: &[u8]) -> Option<Self> {
        bytes.iter().all(|&b| self.push(b)).then_some(self)
    }
}

/// One sequence's JSON-mode constraint: the token table and where the text is.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    tokens: Arc<TokenBytes>,
    state: JsonState,
}

impl JsonConstraint {
    /// At the start of the generated text.
    pub fn new(tokens: Arc<TokenBytes>) -> Self {
        JsonConstraint {
            tokens,
            state: JsonState::default(),
        }
    }

    /// Whether the object is complete (only a stop token may follow).
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }

    /// What the allowed set depends on — the table and the state — while the object is open.
    pub fn key(&self) -> Option<(u64, JsonState)> {
        (!self.is_done()).then_some((self.tokens.id, self.state))
    }

    /// The allowed set of the current state, computed (not remembered).
    pub fn allowed(&self) -> Vec<u64> {
        self.tokens.allowed(self.state)
    }

    /// Sets the logits of every token that cannot come next to −∞: once the object is
    /// complete all but `stop_ids`, before that the stop ids and every token whose bytes
    /// would break the JSON. Should no token fit (a vocabulary without the needed bytes),
    /// the stop ids stay allowed: the text ends rather than breaking the JSON.
    /// `allowed`: the state's set ([`Self::allowed`], remembered by the caller); ignored once
    /// the object is complete.
    pub fn mask(&self, logits: &mut [f32], stop_ids: &[u32], allowed: &[u64]) {
        let done = self.state.is_done();
        let fits = |id: usize| {
            !done
                && allowed
                    .get(id / 64)
                    .is_some_and(|w| w >> (id % 64) & 1 == 1)
        };
        let stuck = !done && !(0..logits.len()).any(fits);
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = if stop_ids.contains(&(id as u32)) {
                done || stuck
            } else {
                fits(id)
            };
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Moves past a sampled token (stop tokens change nothing).
    pub fn advance(&mut self, id: u32) {
        if let Some(Some(b)) = self.tokens.bytes.get(id as usize) {
            if let Some(s) = self.state.after_bytes(b) {
                self.state = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &str) -> Option<JsonState> {
        JsonState::default().after_bytes(text.as_bytes())
    }

    #[test]
    fn valid_objects_are_accepted_and_complete() {
        for t in [
            "{}",
            r#"{"a": 1}"#,
            r#"{"name": "Ada", "age": 36, "langs": ["en", "fr"], "x": null}"#,
            r#"{"n": -0.5e+10, "m": 0, "k": 12.25E-3, "t": true, "f": false}"#,
            "{\n  \"nested\": {\"deep\": [[], [{}], [1, [2, [3]]]]}\n}",
            r#"{"esc": "quote \" slash \\ \/ tab \t unicode \u00e9 \uABCD", "é": "ü"}"#,
        ] {
            let s = accepts(t).unwrap_or_else(|| panic!("rejected {t}"));
            assert!(s.is_done(), "not complete: {t}");
            // Every prefix (bytes) is accepted and, but for the whole, incomplete.
            for i in 0..t.len() {
                let p = JsonState::default().after_bytes(&t.as_bytes()[..i]);
                let p = p.unwrap_or_else(|| panic!("{t}: prefix of {i} bytes rejected"));
                assert!(!p.is_done(), "{t} done after {i} bytes");
            }
        }
    }

    #[test]
    fn invalid_text_is_rejected_at_the_first_bad_byte() {
        for t in [
            "[1]",
            "\"str\"",
            "1",
            "{,}",
            r#"{"a" 1}"#,
            r#"{"a": 1,}"#,
            r#"{"a": [1,]}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": -}"#,
            r#"{"a": 1e}"#,
            r#"{"a": tru}"#,
            r#"{"a": nul1}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\u12G4"}"#,
            "{\"a\": \"line\nbreak\"}",
            r#"{"a": 1]"#,
            r#"{"a": [1}"#,
            r#"{a: 1}"#,
            "{} {}",
            "{}x",
            r#"{"a": 1} "#,
        ] {
            assert!(accepts(t).is_none(), "accepted {t:?}");
        }
    }

    #[test]
    fn whitespace_runs_and_depth_are_bounded() {
        let ok = format!("{{{}\"a\": 1}}", " ".repeat(MAX_SPACE_RUN as usize));
        assert!(accepts(&ok).is_some_and(|s| s.is_done()));
        let long = format!("{{{}\"a\": 1}}", " ".repeat(MAX_SPACE_RUN as usize + 1));
        assert!(accepts(&long).is_none());
        let deep = format!("{{\"a\": {}", "[".repeat(MAX_DEPTH as usize - 1));
        assert!(accepts(&deep).is_some());
        assert!(accepts(&(deep + "[")).is_none());
    }

    #[test]
    fn the_mask_allows_exactly_the_tokens_that_fit_and_stop_only_when_done() {
        // ids: 0 `{`, 1 `{"`, 2 `}`, 3 ` "a`, 4 `":`, 5 ` 1`, 6 `0`, 7 `1}`, 8 stop, 9 none
        let table = Arc::new(TokenBytes::from_texts(&[
            Some("{"),
            Some("{\""),
            Some("}"),
            Some(" \"a"),
            Some("\":"),
            Some(" 1"),
            Some("0"),
            Some("1}"),
            Some("<|end|>"),
            None,
        ]));
        let mut c = JsonConstraint::new(table);
        let allowed = |c: &JsonConstraint| {
            let mut l = vec![0f32; 10];
            c.mask(&mut l, &[8], &c.allowed());
            (0..10).filter(|&i| l[i] == 0.0).collect::<Vec<_>>()
        };
        assert_eq!(allowed(&c), vec![0, 1]);
        // Inside a string any of these bytes fit (`{"` then closes the key: `{` is text).
        for (id, next) in [
            (0, vec![2, 3, 4]),
            (3, vec![0, 1, 2, 4, 5, 6, 7]),
            (4, vec![0, 1, 3, 4, 5, 6, 7]),
            (5, vec![2, 6, 7]),
            (2, vec![8]),
        ] {
            c.advance(id);
            assert_eq!(allowed(&c), next, "after token {id}");
        }
        assert!(c.is_done());
        // A table where nothing fits after `{`: the stop token ends the text.
        let stuck = JsonConstraint::new(Arc::new(TokenBytes::from_texts(&[Some("{"), None])));
        let mut c = stuck.clone();
        c.advance(0);
        let mut l = vec![0f32; 2];
        c.mask(&mut l, &[1], &c.allowed());
        assert_eq!(l, vec![f32::NEG_INFINITY, 0.0]);
        // Closing an object leaves the same state as never having opened it.
        let a = JsonState::default().after_bytes(br#"{"a": {"x": 1}, "b": 2"#);
        let b = JsonState::default().after_bytes(br#"{"a": 1, "b": 2"#);
        assert_eq!(a, b);
    }
}
