//! JSON mode (`response_format: {"type": "json_object"}` or `"json_schema"`): a byte-level
//! recogniser that says, before each token is sampled, which tokens keep the text a prefix of
//! one JSON value the [`Grammar`] allows (any object, or a compiled schema), and when the value
//! is complete (then only a stop token may follow). Its state is a stack of `Frame`s, one
//! per open value, walking the grammar's nodes — or, after a byte that several alternatives
//! of an `anyOf` can start with, one such stack per reading ([`JsonPaths`]) until the text
//! tells them apart.
//!
//! Tokens are judged by their bytes ([`TokenBytes`], plain data the tokenizer's side builds:
//! `text::Tokenizer::token_bytes`); tokens without bytes (special tokens, parts of a
//! multi-byte character) are never allowed inside the JSON. The allowed set of each state is
//! computed by trying every token's bytes (milliseconds) and remembered by the engine core
//! (`EngineCore`'s memo), as generation keeps returning to the same few states.
//!
//! A thinking model's constraint first lets its reasoning through ([`ReasoningTags`]:
//! `<think>` … `</think>` as free text, llama.cpp's lazy grammars' idea) and holds only the
//! answer after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::json_schema::{
    Grammar, Node, NodeId, Prop, ANY, ANY_STRING, NUM_MAX_INT, NUM_SCALE, UNBOUNDED,
};
use super::pattern::{PatPos, Pattern};

/// JSON's two-character escapes and the characters they stand for.
const SHORT_ESCAPES: [(u8, char); 8] = [
    (b'"', '"'),
    (b'\\', '\\'),
    (b'/', '/'),
    (b'b', '\u{8}'),
    (b'f', '\u{c}'),
    (b'n', '\n'),
    (b'r', '\r'),
    (b't', '\t'),
];

/// A character of a pattern's string after a `\`: a short escape, or (`\u`) a control
/// character — the only ones that must be escaped; any other is written as itself, so that
/// each character has one form and the pattern sees it once.
fn escape_step(p: &Pattern, pos: PatPos, len: u16, b: u8) -> Option<(PatPos, u16, Esc)> {
    if b == b'u' {
        return (0..0x20u8)
            .any(|c| p.step_char(pos, len.into(), char::from(c)).is_some())
            .then_some((pos, len, Esc::Hex(4, 0)));
    }
    let &(_, c) = SHORT_ESCAPES.iter().find(|(e, _)| *e == b)?;
    let (pos, len) = p.step_char(pos, len.into(), c)?;
    Some((pos, len as u16, Esc::None))
}

/// A hex digit `b` of a pattern's string's `\u` escape, `n` digits due with `v` so far: only
/// control characters (below U+0020) that the pattern can go on with.
fn hex_step(
    p: &Pattern,
    pos: PatPos,
    len: u16,
    n: u8,
    v: u16,
    b: u8,
) -> Option<(PatPos, u16, Esc)> {
    let d = (b as char).to_digit(16)? as u16;
    let v = v * 16 + d;
    let n = n - 1;
    if n > 0 {
        let span = 16u32.pow(u32::from(n));
        let lo = u32::from(v) * span;
        return (lo..(lo + span).min(0x20))
            .any(|c| p.step_char(pos, len.into(), char::from(c as u8)).is_some())
            .then_some((pos, len, Esc::Hex(n, v)));
    }
    if v >= 0x20 {
        return None;
    }
    let (pos, len) = p.step_char(pos, len.into(), char::from(v as u8))?;
    Some((pos, len as u16, Esc::None))
}

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

    /// Bit `id` set for every token whose bytes `state` accepts under `g`.
    pub fn allowed(&self, g: &Grammar, state: &JsonPaths) -> Vec<u64> {
        // Most tokens fail on their first byte: those bytes are tried once each.
        let mut first = [false; 256];
        for (b, ok) in first.iter_mut().enumerate() {
            *ok = state.accepts(g, &[b as u8]);
        }
        let mut set = vec![0u64; self.bytes.len().div_ceil(64)];
        for (id, b) in self.bytes.iter().enumerate() {
            let fits = b.as_deref().is_some_and(|b| match b.first() {
                None => true,
                Some(&f) => first[usize::from(f)] && state.accepts(g, b),
            });
            if fits {
                set[id / 64] |= 1 << (id % 64);
            }
        }
        set
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Esc {
    None,
    Backslash,
    /// Hex digits still due after `\u`, and (in a pattern's string) the value so far.
    Hex(u8, u16),
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

    /// The state after `b` (`None`: `b` does not continue a number here); `from` is `None`
    /// before the first byte.
    fn after(from: Option<Num>, integer: bool, b: u8) -> Option<Num> {
        Some(match (from, b) {
            (None, b'-') => Num::Minus,
            (None | Some(Num::Minus), b'0') => Num::Zero,
            (None | Some(Num::Minus), b'1'..=b'9') => Num::Int,
            (Some(Num::Int), b'0'..=b'9') => Num::Int,
            (Some(Num::Zero | Num::Int), b'.') if !integer => Num::Dot,
            (Some(Num::Dot | Num::Frac), b'0'..=b'9') => Num::Frac,
            (Some(Num::Zero | Num::Int | Num::Frac), b'e' | b'E') if !integer => Num::E,
            (Some(Num::E), b'+' | b'-') => Num::ESign,
            (Some(Num::E | Num::ESign | Num::Exp), b'0'..=b'9') => Num::Exp,
            _ => return None,
        })
    }
}

/// A bounded number's text so far: its node (for the bounds), sign, integer part and
/// decimals. Unbounded numbers keep the default, so that equal positions are equal states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NumVal {
    /// The number's node; [`NO_NODE`] when unbounded.
    node: NodeId,
    neg: bool,
    /// Decimals so far (at most 9).
    decimals: u8,
    int: u32,
    /// The decimals as an integer.
    frac: u32,
}

const NO_NODE: NodeId = NodeId::MAX;

impl Default for NumVal {
    fn default() -> Self {
        NumVal {
            node: NO_NODE,
            neg: false,
            decimals: 0,
            int: 0,
            frac: 0,
        }
    }
}

impl NumVal {
    fn bounds(self, g: &Grammar) -> Option<[i128; 2]> {
        if self.node == NO_NODE {
            return None;
        }
        match g.resolve(self.node).1 {
            Node::Number { bounds, .. } => *bounds,
            _ => None,
        }
    }

    /// What the value must be a multiple of (`multipleOf`), in units of 10⁻⁹.
    fn step(self, g: &Grammar) -> Option<i128> {
        if self.node == NO_NODE {
            return None;
        }
        match g.resolve(self.node).1 {
            Node::Number { step, .. } => *step,
            _ => None,
        }
    }

    /// The value so far in units of 10⁻⁹, without its sign.
    fn magnitude(self) -> i128 {
        i128::from(self.int) * NUM_SCALE
            + i128::from(self.frac) * 10i128.pow(9 - u32::from(self.decimals))
    }

    /// `self` after byte `b` took the number to `num`; `None` where a bounded number cannot
    /// go (an exponent, a 10th decimal, an integer part beyond 32 bits).
    fn after(mut self, num: Num, b: u8) -> Option<NumVal> {
        if self.node == NO_NODE {
            return Some(self);
        }
        let d = u32::from(b.wrapping_sub(b'0'));
        match num {
            Num::Minus => self.neg = true,
            Num::Zero | Num::Int => self.int = self.int.checked_mul(10)?.checked_add(d)?,
            Num::Dot => {}
            Num::Frac if self.decimals < 9 => {
                self.decimals += 1;
                self.frac = self.frac * 10 + d;
            }
            Num::Frac | Num::E | Num::ESign | Num::Exp => return None,
        }
        Some(self)
    }

    /// Whether a number whose text so far left it in `num` can still end inside `[lo, hi]`:
    /// the values its continuations reach, as intervals of magnitudes, against the bounds.
    /// With a `step`, some multiple of it must lie there: the spans hold every value of
    /// their range a number can be written as (every unit for a float, whole numbers for an
    /// integer, where the step is a multiple of a whole unit).
    fn can_reach(self, num: Num, integer: bool, [lo, hi]: [i128; 2], step: Option<i128>) -> bool {
        let unit = NUM_SCALE;
        // Decimals a float may still add below a magnitude `m` (a whole number of units).
        let tail = |m: i128| if integer { m } else { m + unit - 1 };
        let top = NUM_MAX_INT * unit;
        let mut spans: Vec<(i128, i128)> = Vec::new();
        match num {
            // A sign only where a value below zero may follow (no "-0" for a minimum of 0).
            Num::Minus => spans.push((1, tail(top))),
            Num::Zero => spans.push((0, tail(0))),
            Num::Int => {
                // This integer part, or more digits: [I·10^k, (I+1)·10^k − 1].
                let (mut a, mut b) = (i128::from(self.int), i128::from(self.int));
                while a <= NUM_MAX_INT {
                    spans.push((a * unit, tail(b.min(NUM_MAX_INT) * unit)));
                    (a, b) = (a * 10, b * 10 + 9);
                }
            }
            Num::Dot | Num::Frac => {
                let m = self.magnitude();
                spans.push((m, m + 10i128.pow(9 - u32::from(self.decimals)) - 1));
            }
            Num::E | Num::ESign | Num::Exp => return false,
        }
        spans.into_iter().any(|(a, b)| {
            let (a, b) = if self.neg { (-b, -a) } else { (a, b) };
            let (a, b) = (a.max(lo), b.min(hi));
            a <= b && step.is_none_or(|s| b.div_euclid(s) * s >= a)
        })
    }

    /// Whether the number, complete in `num`, lies inside its bounds and is a multiple of its
    /// step (where it has them).
    fn within(self, num: Num, g: &Grammar) -> bool {
        let m = self.magnitude();
        let v = if self.neg { -m } else { m };
        num.complete()
            && self.bounds(g).is_none_or(|[lo, hi]| lo <= v && v <= hi)
            && self.step(g).is_none_or(|s| v % s == 0)
    }
}

/// A number's state after `b`, within its bounds if it has any: `None` where `b` does not
/// continue it, or where no continuation could end inside the bounds.
fn num_step(
    g: &Grammar,
    integer: bool,
    from: Option<Num>,
    val: NumVal,
    b: u8,
) -> Option<(Num, NumVal)> {
    let num = Num::after(from, integer, b)?;
    let Some(bounds) = val.bounds(g) else {
        return Some((num, val));
    };
    let val = val.after(num, b)?;
    val.can_reach(num, integer, bounds, val.step(g))
        .then_some((num, val))
}

/// The property index of a free key (an object without declared properties).
const FREE: u16 = u16::MAX;

/// Where an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ObjAt {
    /// After `{`: a key or `}`.
    Open,
    /// After `,`: a key.
    Comma,
    /// Inside a declared key: the lowest-numbered property whose key starts with the bytes so
    /// far (keys are quoted, so none is a prefix of another), and how many bytes are done.
    Key { prop: u16, pos: u16 },
    /// A free key (a string frame above this one).
    FreeKey,
    /// After property `prop`'s key: `:`.
    Colon { prop: u16 },
    /// After `:`: property `prop`'s value must start.
    Value { prop: u16 },
    /// Property `prop`'s value is in the frames above.
    InValue { prop: u16 },
    /// After a value: `,` or `}`.
    After,
}

/// Where an array is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ArrAt {
    /// After `[`: an item or `]`.
    Open,
    /// After `,`: an item.
    Comma,
    /// An item is in the frames above.
    InValue,
    /// After an item: `,` or `]`.
    After,
}

/// One open value. Counters (`next`, `count`, `len`) only move where the schema bounds them,
/// so that equal positions in the text stay equal states (and share a memoised set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
enum Frame {
    /// An unused slot.
    #[default]
    Empty,
    /// The whole text: the grammar's root value, then nothing.
    Root { done: bool },
    /// An object; properties before `next` are given or skipped.
    Obj { node: NodeId, next: u16, at: ObjAt },
    /// An array with `count` items so far.
    Arr { node: NodeId, count: u16, at: ArrAt },
    /// A string of `len` characters so far; `pat`: where its pattern (if any) stands.
    Str {
        node: NodeId,
        len: u16,
        esc: Esc,
        pat: PatPos,
    },
    /// Raw text matching a pattern ([`Node::Regex`]), `len` characters so far.
    Raw { node: NodeId, len: u16, pat: PatPos },
    /// A number.
    Num {
        integer: bool,
        num: Num,
        val: NumVal,
    },
    /// One of a node's literal texts: the lowest-numbered one that starts with the bytes so
    /// far, and how many bytes are done.
    Lit { node: NodeId, cand: u16, pos: u16 },
    /// Free text (a [`Node::TextOr`] that did not start with `{`): anything goes, to the end.
    Free,
    /// A GBNF sequence ([`Node::Seq`]) at its piece `at` (open above it, or next).
    Seq { node: NodeId, at: u16 },
    /// A GBNF repetition ([`Node::Rep`]) with `count` items done (counted where bounds need
    /// it), the next open above it or to come.
    Rep { node: NodeId, count: u16 },
}

/// How a value starts with a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The byte began it.
    Took,
    /// It ended empty (a GBNF piece that can be): the byte is the next piece's.
    Empty,
    /// It cannot start here.
    Fail,
}

impl Frame {
    /// Whether whitespace may come here (between the tokens of the JSON).
    fn takes_space(self) -> bool {
        match self {
            Frame::Root { done } => !done,
            Frame::Obj { at, .. } => !matches!(
                at,
                ObjAt::Key { .. } | ObjAt::FreeKey | ObjAt::InValue { .. }
            ),
            Frame::Arr { at, .. } => at != ArrAt::InValue,
            _ => false,
        }
    }
}

/// What one byte does to the innermost frame.
enum Step {
    /// Consumed: the frame becomes this.
    Stay(Frame),
    /// The frame becomes this, and a value of the node starts with the byte.
    Begin(Frame, NodeId),
    /// Consumed, and the frame's value is complete.
    Close,
    /// Not consumed, but the frame's value is complete (a number or a literal that could
    /// have gone on): the enclosing frame takes the byte.
    Retry,
    /// The byte cannot come here.
    Reject,
}

/// Deepest nesting: the root, containers, and a string, number or literal inside.
const MAX_FRAMES: usize = 32;

/// The recogniser's state: `Copy`, so every candidate token is tried on a copy, and
/// hashable, so the engine remembers each state's allowed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsonState {
    frames: [Frame; MAX_FRAMES],
    depth: u8,
    /// Whitespace bytes in a row outside strings.
    space_run: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        let mut frames = [Frame::Empty; MAX_FRAMES];
        frames[0] = Frame::Root { done: false };
        JsonState {
            frames,
            depth: 1,
            space_run: 0,
        }
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The first property a key may name after `next` (the candidates run from `next` to the
/// first required one), and whether the object may close. `one`: exactly one property.
fn key_range(props: &[Prop], next: u16, one: bool) -> (std::ops::Range<usize>, bool) {
    if one {
        return if next == 0 {
            (0..props.len(), false)
        } else {
            (props.len()..props.len(), true)
        };
    }
    let from = usize::from(next).min(props.len());
    match props[from..].iter().position(|p| p.required) {
        Some(r) => (from..from + r + 1, false),
        None => (from..props.len(), true),
    }
}

/// Whether literal `j` continues literal `cand`'s first `pos` bytes with `b`.
fn lit_continues(lits: &[Box<[u8]>], cand: usize, j: usize, pos: usize, b: u8) -> bool {
    lits[j].len() > pos && lits[j][..pos] == lits[cand][..pos] && lits[j][pos] == b
}

impl JsonState {
    /// Whether the root value is complete (only a stop token may follow).
    fn is_done(&self) -> bool {
        self.frames[0] == Frame::Root { done: true }
    }

    /// Whether the text left the grammar for free text (no constraint from here on).
    fn is_free(&self) -> bool {
        self.frames[usize::from(self.depth) - 1] == Frame::Free
    }

    /// Whether the text may end here: the root value is complete, or it is a number or a
    /// literal that could also go on, or free text.
    fn can_end(&self, g: &Grammar) -> bool {
        if self.is_done() || self.is_free() {
            return true;
        }
        if self.depth == 1 {
            // A regex answer may be empty.
            return g.nullable(g.root)
                || matches!(g.resolve(g.root).1, Node::Regex(p) if p.accepts(p.start(), 0));
        }
        if g.has_pieces() {
            return self.pieces_can_end(g);
        }
        self.depth == 2
            && match self.frames[1] {
                Frame::Raw { node, len, pat } => {
                    matches!(g.resolve(node).1, Node::Regex(p) if p.accepts(pat, len.into()))
                }
                Frame::Num { num, val, .. } => val.within(num, g),
                Frame::Lit { node, cand, pos } => match g.resolve(node).1 {
                    Node::Literals(l) => {
                        let (c, p) = (usize::from(cand), usize::from(pos));
                        l.iter().any(|t| t.len() == p && t[..] == l[c][..p])
                    }
                    _ => false,
                },
                _ => false,
            }
    }

    /// Whether every open GBNF piece can end here (each frame's rest can be empty).
    fn pieces_can_end(&self, g: &Grammar) -> bool {
        let d = usize::from(self.depth);
        (1..d).all(|i| {
            // Below the top, the frame's current piece is open above it and will be done.
            let open = usize::from(i + 1 < d);
            match self.frames[i] {
                Frame::Raw { node, len, pat } => {
                    matches!(g.resolve(node).1, Node::Regex(p) if p.accepts(pat, len.into()))
                }
                Frame::Seq { node, at } => match g.resolve(node).1 {
                    Node::Seq(items) => items
                        .iter()
                        .skip(usize::from(at) + open)
                        .all(|&n| g.nullable(n)),
                    _ => false,
                },
                Frame::Rep { node, count } => match g.resolve(node).1 {
                    Node::Rep { item, min, .. } => {
                        u32::from(count) + open as u32 >= *min || g.nullable(*item)
                    }
                    _ => false,
                },
                _ => false,
            }
        })
    }

    fn top(&mut self) -> &mut Frame {
        &mut self.frames[usize::from(self.depth) - 1]
    }

    fn open(&mut self, f: Frame) -> bool {
        if usize::from(self.depth) >= MAX_FRAMES {
            return false;
        }
        self.frames[usize::from(self.depth)] = f;
        self.depth += 1;
        true
    }

    /// Ends the innermost value; its container moves past it.
    fn pop(&mut self, g: &Grammar) {
        self.discard();
        self.after_child(g);
    }

    /// Drops the innermost frame.
    fn discard(&mut self) {
        self.depth -= 1;
        // Unused slots stay clear: equal states compare (and memoise) equal.
        self.frames[usize::from(self.depth)] = Frame::Empty;
    }

    /// The innermost frame's current value is complete: it moves past it (a sequence or
    /// repetition that has nothing left ends too).
    fn after_child(&mut self, g: &Grammar) {
        match self.top() {
            Frame::Root { done } => *done = true,
            Frame::Obj { next, at, .. } => {
                *at = match *at {
                    ObjAt::FreeKey => ObjAt::Colon { prop: FREE },
                    ObjAt::InValue { prop } => {
                        if prop != FREE {
                            *next = prop + 1;
                        }
                        ObjAt::After
                    }
                    other => other,
                }
            }
            Frame::Arr { node, count, at } => {
                if let Node::Array {
                    min, max, prefix, ..
                } = g.resolve(*node).1
                {
                    // Counted where bounds or a tuple's places need it (else equal
                    // positions stay equal states).
                    if *min > 0 || *max != UNBOUNDED || usize::from(*count) < prefix.len() {
                        *count = count.saturating_add(1);
                    }
                }
                *at = ArrAt::After;
            }
            Frame::Seq { node, at } => {
                *at += 1;
                let done = matches!(g.resolve(*node).1, Node::Seq(items) if usize::from(*at) >= items.len());
                if done {
                    self.pop(g);
                }
            }
            Frame::Rep { node, count } => {
                if let Node::Rep { min, max, .. } = g.resolve(*node).1 {
                    if u32::from(*count) < *min || *max != UNBOUNDED {
                        *count = count.saturating_add(1);
                    }
                    if u32::from(*count) >= *max {
                        self.pop(g);
                    }
                }
            }
            _ => {}
        }
    }

    /// Starts a value of `node` with its first byte `b` — or, for a GBNF piece that can be
    /// empty, ends it empty (`b` is then the next piece's). `ch`: which way to go where more
    /// than one can start with `b`.
    fn begin(&mut self, g: &Grammar, node: NodeId, b: u8, ch: &mut Choices) -> Start {
        let (id, n) = g.resolve(node);
        match n {
            Node::OneOf(alts) => {
                let candidates = || alts.iter().filter(|&&a| g.can_start(a, b) || g.nullable(a));
                let n = candidates().count();
                if n == 0 {
                    return Start::Fail;
                }
                let Some(k) = ch.choose(n) else {
                    return Start::Fail;
                };
                match candidates().nth(k) {
                    Some(&a) => self.begin(g, a, b, ch),
                    None => Start::Fail,
                }
            }
            Node::Regex(p) => {
                let step = p.step(p.start(), 0, b);
                let empty = g.nullable(id);
                let take = match (step.is_some(), empty) {
                    (true, true) => match ch.choose(2) {
                        Some(k) => k == 0,
                        None => return Start::Fail,
                    },
                    (take, _) => take,
                };
                if !take {
                    return if empty { Start::Empty } else { Start::Fail };
                }
                let Some((pat, len)) = step else {
                    return Start::Fail;
                };
                if !self.open(Frame::Raw {
                    node: id,
                    len: len as u16,
                    pat,
                }) {
                    return Start::Fail;
                }
                if p.is_final(pat, len) {
                    self.pop(g);
                }
                Start::Took
            }
            Node::Seq(_) => {
                if !self.open(Frame::Seq { node: id, at: 0 }) {
                    return Start::Fail;
                }
                self.begin_next(g, b, ch)
            }
            Node::Rep { item, max, .. } => {
                let more = *max > 0 && g.can_start(*item, b);
                let end = g.nullable(id);
                let go = match (more, end) {
                    (true, true) => match ch.choose(2) {
                        Some(k) => k == 0,
                        None => return Start::Fail,
                    },
                    (more, _) => more,
                };
                if !go {
                    return if end { Start::Empty } else { Start::Fail };
                }
                if !self.open(Frame::Rep { node: id, count: 0 }) {
                    return Start::Fail;
                }
                match self.begin(g, *item, b, ch) {
                    Start::Took => Start::Took,
                    // An empty item repeats nothing.
                    Start::Empty | Start::Fail => Start::Fail,
                }
            }
            _ => {
                if self.begin_value(g, id, b, ch) {
                    Start::Took
                } else {
                    Start::Fail
                }
            }
        }
    }

    /// Begins the innermost frame's (a [`Frame::Seq`]'s) next piece with `b`, going past
    /// pieces that end empty; `Empty` (the frame gone) when every remaining piece did.
    fn begin_next(&mut self, g: &Grammar, b: u8, ch: &mut Choices) -> Start {
        loop {
            let Frame::Seq { node, at } = *self.top() else {
                return Start::Fail;
            };
            let Node::Seq(items) = g.resolve(node).1 else {
                return Start::Fail;
            };
            let Some(&item) = items.get(usize::from(at)) else {
                self.discard();
                return Start::Empty;
            };
            match self.begin(g, item, b, ch) {
                Start::Took => return Start::Took,
                Start::Fail => return Start::Fail,
                Start::Empty => {
                    *self.top() = Frame::Seq { node, at: at + 1 };
                }
            }
        }
    }

    /// Starts a JSON value of `id` (resolved) with its first byte.
    fn begin_value(&mut self, g: &Grammar, id: NodeId, b: u8, ch: &mut Choices) -> bool {
        let n = &g.nodes[usize::from(id)];
        match n {
            Node::Object { .. } => {
                b == b'{'
                    && self.open(Frame::Obj {
                        node: id,
                        next: 0,
                        at: ObjAt::Open,
                    })
            }
            Node::Array { .. } => {
                b == b'['
                    && self.open(Frame::Arr {
                        node: id,
                        count: 0,
                        at: ArrAt::Open,
                    })
            }
            Node::String { pattern, .. } => {
                b == b'"'
                    && self.open(Frame::Str {
                        node: id,
                        len: 0,
                        esc: Esc::None,
                        pat: pattern.as_ref().map(|p| p.start()).unwrap_or_default(),
                    })
            }
            Node::Number {
                integer, bounds, ..
            } => {
                let start = NumVal {
                    node: if bounds.is_some() { id } else { NO_NODE },
                    ..NumVal::default()
                };
                let Some((num, val)) = num_step(g, *integer, None, start, b) else {
                    return false;
                };
                self.open(Frame::Num {
                    integer: *integer,
                    num,
                    val,
                })
            }
            Node::Literals(l) => {
                let Some(cand) = l.iter().position(|t| t.first() == Some(&b)) else {
                    return false;
                };
                if !self.open(Frame::Lit {
                    node: id,
                    cand: cand as u16,
                    pos: 0,
                }) {
                    return false;
                }
                let top = *self.top();
                match self.step(g, top, b, ch) {
                    Step::Stay(f) => *self.top() = f,
                    _ => self.pop(g),
                }
                true
            }
            Node::TextOr(inner) if g.can_start(*inner, b) => {
                self.begin(g, *inner, b, ch) == Start::Took
            }
            Node::TextOr(_) => self.open(Frame::Free),
            _ => false,
        }
    }

    /// What `b` does to frame `f` (the innermost).
    fn step(&self, g: &Grammar, f: Frame, b: u8, ch: &mut Choices) -> Step {
        // Either way where both can: go on with `b`, or end here and give `b` on.
        let either = |ch: &mut Choices, on: Step| match ch.choose(2) {
            Some(0) => on,
            Some(_) => Step::Retry,
            None => Step::Reject,
        };
        match f {
            Frame::Empty | Frame::Root { done: true } => Step::Reject,
            Frame::Free => Step::Stay(f),
            Frame::Root { done: false } => Step::Begin(f, g.root),
            Frame::Obj { node, next, at } => {
                let Node::Object { props, extra, one } = g.resolve(node).1 else {
                    return Step::Reject;
                };
                let (range, can_close) = key_range(props, next, *one);
                let obj = |at| Frame::Obj { node, next, at };
                let key_start = || {
                    if !range.is_empty() {
                        Step::Stay(obj(ObjAt::Key {
                            prop: range.start as u16,
                            pos: 1,
                        }))
                    } else if props.is_empty() && extra.is_some() {
                        Step::Begin(obj(ObjAt::FreeKey), ANY_STRING)
                    } else {
                        Step::Reject
                    }
                };
                match (at, b) {
                    (ObjAt::Open, b'}') if can_close => Step::Close,
                    (ObjAt::Open | ObjAt::Comma, b'"') => key_start(),
                    (ObjAt::Key { prop, pos }, _) => {
                        let (p, pos) = (usize::from(prop), usize::from(pos));
                        let keys = |j: usize| &props[j].key[..];
                        match range.clone().find(|&j| {
                            keys(j).len() > pos
                                && keys(j)[..pos] == keys(p)[..pos]
                                && keys(j)[pos] == b
                        }) {
                            Some(j) if keys(j).len() == pos + 1 => {
                                Step::Stay(obj(ObjAt::Colon { prop: j as u16 }))
                            }
                            Some(j) => Step::Stay(obj(ObjAt::Key {
                                prop: j as u16,
                                pos: (pos as u16).saturating_add(1),
                            })),
                            None => Step::Reject,
                        }
                    }
                    (ObjAt::Colon { prop }, b':') => Step::Stay(obj(ObjAt::Value { prop })),
                    (ObjAt::Value { prop }, _) => {
                        let value = if prop == FREE {
                            extra.unwrap_or(ANY)
                        } else {
                            props[usize::from(prop)].value
                        };
                        Step::Begin(obj(ObjAt::InValue { prop }), value)
                    }
                    (ObjAt::After, b',')
                        if !range.is_empty() || props.is_empty() && extra.is_some() =>
                    {
                        Step::Stay(obj(ObjAt::Comma))
                    }
                    (ObjAt::After, b'}') if can_close => Step::Close,
                    _ => Step::Reject,
                }
            }
            Frame::Arr { node, count, at } => {
                let Node::Array {
                    items,
                    min,
                    max,
                    ref prefix,
                } = *g.resolve(node).1
                else {
                    return Step::Reject;
                };
                let items = prefix.get(usize::from(count)).copied().unwrap_or(items);
                let arr = |at| Frame::Arr { node, count, at };
                match (at, b) {
                    (ArrAt::Open, b']') if min == 0 => Step::Close,
                    (ArrAt::Open, _) if max > 0 => Step::Begin(arr(ArrAt::InValue), items),
                    (ArrAt::Comma, _) => Step::Begin(arr(ArrAt::InValue), items),
                    (ArrAt::After, b',') if u32::from(count) < max => Step::Stay(arr(ArrAt::Comma)),
                    (ArrAt::After, b']') if u32::from(count) >= min => Step::Close,
                    _ => Step::Reject,
                }
            }
            Frame::Raw { node, len, pat } => {
                let Node::Regex(p) = g.resolve(node).1 else {
                    return Step::Reject;
                };
                // A GBNF piece may also end here, its sequence or repetition going on.
                let d = usize::from(self.depth);
                let piece =
                    d >= 2 && matches!(self.frames[d - 2], Frame::Seq { .. } | Frame::Rep { .. });
                let can_end = piece && p.accepts(pat, len.into());
                let on = match p.step(pat, len.into(), b) {
                    Some((pat, len)) if p.is_final(pat, len) => Step::Close,
                    Some((pat, len)) => Step::Stay(Frame::Raw {
                        node,
                        len: len as u16,
                        pat,
                    }),
                    None if can_end => return Step::Retry,
                    None => return Step::Reject,
                };
                if can_end {
                    either(ch, on)
                } else {
                    on
                }
            }
            Frame::Seq { node, at } => match g.resolve(node).1 {
                Node::Seq(items) => match items.get(usize::from(at)) {
                    Some(&item) => Step::Begin(f, item),
                    None => Step::Retry,
                },
                _ => Step::Reject,
            },
            Frame::Rep { node, count } => {
                let Node::Rep { item, min, max } = *g.resolve(node).1 else {
                    return Step::Reject;
                };
                let more = u32::from(count) < max && g.can_start(item, b);
                let end = u32::from(count) >= min || g.nullable(item);
                match (more, end) {
                    (true, true) => either(ch, Step::Begin(f, item)),
                    (true, false) => Step::Begin(f, item),
                    (false, true) => Step::Retry,
                    (false, false) => Step::Reject,
                }
            }
            Frame::Str {
                node,
                len,
                esc,
                pat,
            } => {
                let Node::String {
                    min, max, pattern, ..
                } = g.resolve(node).1
                else {
                    return Step::Reject;
                };
                if let Some(p) = pattern {
                    let at = |(pat, len, esc): (PatPos, u16, Esc)| {
                        Step::Stay(Frame::Str {
                            node,
                            len,
                            esc,
                            pat,
                        })
                    };
                    let next = match esc {
                        Esc::None => match b {
                            b'"' if p.accepts(pat, len.into()) => return Step::Close,
                            b'"' | 0..=0x1F => None,
                            // Some escape (a short one or `\u`) must go on from here.
                            b'\\' => SHORT_ESCAPES
                                .iter()
                                .map(|&(e, _)| e)
                                .chain([b'u'])
                                .any(|e| escape_step(p, pat, len, e).is_some())
                                .then_some((pat, len, Esc::Backslash)),
                            _ => p
                                .step(pat, len.into(), b)
                                .map(|(pat, len)| (pat, len as u16, Esc::None)),
                        },
                        Esc::Backslash => escape_step(p, pat, len, b),
                        Esc::Hex(n, v) => hex_step(p, pat, len, n, v, b),
                    };
                    return next.map_or(Step::Reject, at);
                }
                let (min, max) = (*min, *max);
                let bounded = min > 0 || max != UNBOUNDED;
                // A character starts here: counted where the schema bounds the length.
                let new_char = |esc| {
                    if !bounded {
                        Step::Stay(Frame::Str {
                            node,
                            len,
                            esc,
                            pat,
                        })
                    } else if u32::from(len) >= max {
                        Step::Reject
                    } else {
                        Step::Stay(Frame::Str {
                            node,
                            len: len.saturating_add(1),
                            esc,
                            pat,
                        })
                    }
                };
                let stay = |esc| {
                    Step::Stay(Frame::Str {
                        node,
                        len,
                        esc,
                        pat,
                    })
                };
                match esc {
                    Esc::None => match b {
                        b'"' if u32::from(len) >= min => Step::Close,
                        b'"' | 0..=0x1F => Step::Reject,
                        b'\\' => new_char(Esc::Backslash),
                        // UTF-8 continuation bytes belong to the character before.
                        0x80..=0xBF => stay(Esc::None),
                        _ => new_char(Esc::None),
                    },
                    Esc::Backslash => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => stay(Esc::None),
                        b'u' => stay(Esc::Hex(4, 0)),
                        _ => Step::Reject,
                    },
                    Esc::Hex(n, _) if b.is_ascii_hexdigit() => {
                        stay(if n > 1 { Esc::Hex(n - 1, 0) } else { Esc::None })
                    }
                    Esc::Hex(..) => Step::Reject,
                }
            }
            Frame::Num { integer, num, val } => match num_step(g, integer, Some(num), val, b) {
                Some((num, val)) => Step::Stay(Frame::Num { integer, num, val }),
                // The number ends at its first byte that cannot continue it.
                None if val.within(num, g) => Step::Retry,
                None => Step::Reject,
            },
            Frame::Lit { node, cand, pos } => {
                let Node::Literals(l) = g.resolve(node).1 else {
                    return Step::Reject;
                };
                let (c, p) = (usize::from(cand), usize::from(pos));
                match (0..l.len()).find(|&j| lit_continues(l, c, j, p, b)) {
                    Some(j) => {
                        // Complete, and no other literal goes on from here: the value ends.
                        let longer =
                            (0..l.len()).any(|k| l[k].len() > p + 1 && l[k][..=p] == l[j][..=p]);
                        if l[j].len() == p + 1 && !longer {
                            Step::Close
                        } else {
                            Step::Stay(Frame::Lit {
                                node,
                                cand: j as u16,
                                pos: pos.saturating_add(1),
                            })
                        }
                    }
                    None if l.iter().any(|t| t.len() == p && t[..] == l[c][..p]) => Step::Retry,
                    None => Step::Reject,
                }
            }
        }
    }

    /// Feeds one byte along the alternatives `ch` gives; `false` if this reading of the text
    /// can no longer be a prefix of a value `g` allows.
    fn push(&mut self, g: &Grammar, b: u8, ch: &mut Choices) -> bool {
        loop {
            let top = *self.top();
            if is_space(b) && top.takes_space() && (self.depth > 1 || g.root_space) {
                if self.space_run >= MAX_SPACE_RUN {
                    return false;
                }
                self.space_run += 1;
                return true;
            }
            match self.step(g, top, b, ch) {
                Step::Stay(f) => *self.top() = f,
                Step::Begin(f, node) => {
                    *self.top() = f;
                    match self.begin(g, node, b, ch) {
                        Start::Took => {}
                        Start::Fail => return false,
                        // An empty item repeats nothing.
                        Start::Empty if matches!(f, Frame::Rep { .. }) => return false,
                        // An empty piece: the next one takes the byte.
                        Start::Empty => {
                            self.after_child(g);
                            continue;
                        }
                    }
                }
                Step::Close => self.pop(g),
                Step::Retry => {
                    self.pop(g);
                    continue;
                }
                Step::Reject => return false,
            }
            self.space_run = 0;
            return true;
        }
    }

    /// Every state `b` can lead to (one per alternative it can start, where several can),
    /// added to `out` unless already there, while `out` holds fewer than [`MAX_PATHS`]; the
    /// earlier alternatives first.
    fn successors(&self, g: &Grammar, b: u8, out: &mut Vec<JsonState>) {
        let add = |s: JsonState, out: &mut Vec<JsonState>| {
            if out.len() < MAX_PATHS && !out.contains(&s) {
                out.push(s);
            }
        };
        let mut s = *self;
        let mut ch = Choices::default();
        let ok = s.push(g, b, &mut ch);
        if ch.forks().is_empty() {
            if ok {
                add(s, out);
            }
            return;
        }
        // Depth first over the choices: each run takes the given ones, then first candidates,
        // and every later candidate of its own new choices becomes a run to do.
        let mut todo = vec![(s, ok, ch)];
        while let Some((s, ok, ch)) = todo.pop() {
            if ok {
                add(s, out);
            }
            let mut runs = Vec::new();
            for &(i, n) in ch.forks() {
                for alt in 1..n {
                    let mut next = ch.taking(i, alt);
                    let mut s = *self;
                    let ok = s.push(g, b, &mut next);
                    runs.push((s, ok, next));
                }
            }
            // The stack pops the last first: push in reverse to keep the earlier first.
            todo.extend(runs.into_iter().rev());
        }
    }

    /// Whether `bytes` keep some reading of the text a prefix of a value `g` allows.
    fn accepts(&self, g: &Grammar, bytes: &[u8]) -> bool {
        // One copy, pushed in place (the allowed sets' hot loop); only where a byte meets
        // alternatives are the bytes before it replayed, to try each of them.
        let mut s = *self;
        for (i, &b) in bytes.iter().enumerate() {
            let mut ch = Choices::default();
            let ok = s.push(g, b, &mut ch);
            if !ch.forks().is_empty() {
                let mut before = *self;
                for &b in &bytes[..i] {
                    before.push(g, b, &mut Choices::default());
                }
                return before.accepts_after_fork(g, b, &bytes[i + 1..], (s, ok, ch));
            }
            if !ok {
                return false;
            }
        }
        true
    }

    /// Whether some way through byte `b` from here — `run` is the first (its state, whether
    /// it took `b`, its choices) — goes on through `rest`: depth first, each run's later
    /// candidates tried only when the earlier ones fail, without allocating (the allowed
    /// sets' hot loop meets such forks at every token where a piece may end or go on).
    fn accepts_after_fork(
        &self,
        g: &Grammar,
        b: u8,
        rest: &[u8],
        run: (JsonState, bool, Choices),
    ) -> bool {
        let (s, ok, ch) = run;
        if ok && s.accepts(g, rest) {
            return true;
        }
        for &(i, n) in ch.forks() {
            for alt in 1..n {
                let mut next = ch.taking(i, alt);
                let mut s = *self;
                let ok = s.push(g, b, &mut next);
                if self.accepts_after_fork(g, b, rest, (s, ok, next)) {
                    return true;
                }
            }
        }
        false
    }
}

/// Most readings of one text kept at once ([`JsonPaths`]); past it later alternatives are
/// dropped: the text stays valid, some continuations are no longer offered.
const MAX_PATHS: usize = 16;
/// Most alternatives one byte can choose among in turn (nested `anyOf`s starting together).
const MAX_CHOICES: usize = 8;

/// The alternatives taken at the `anyOf`s one byte starts where more than one can start with
/// it, in order: the given ones, then the first candidate each, counting the candidates.
#[derive(Debug, Default, Clone, Copy)]
struct Choices {
    given: [u8; MAX_CHOICES],
    n_given: u8,
    at: u8,
    n_open: u8,
    /// Choices after the given ones with more than one candidate: (index, candidates).
    open: [(u8, u8); MAX_CHOICES],
}

impl Choices {
    /// Which of `n` candidates to take; `None` past [`MAX_CHOICES`] choices (a lone
    /// candidate is no choice).
    fn choose(&mut self, n: usize) -> Option<usize> {
        if n <= 1 {
            return Some(0);
        }
        let i = self.at;
        if usize::from(i) >= MAX_CHOICES {
            return None;
        }
        self.at += 1;
        if i < self.n_given {
            return Some(usize::from(self.given[usize::from(i)]));
        }
        if n > 1 {
            self.open[usize::from(self.n_open)] = (i, n.min(usize::from(u8::MAX)) as u8);
            self.n_open += 1;
        }
        Some(0)
    }

    /// The run that takes this run's choices up to choice `i` (the first candidate where
    /// this one was not given any), then candidate `alt` there.
    fn taking(&self, i: u8, alt: u8) -> Choices {
        let mut given = self.given;
        given[usize::from(self.n_given)..usize::from(i)].fill(0);
        given[usize::from(i)] = alt;
        Choices {
            given,
            n_given: i + 1,
            ..Choices::default()
        }
    }

    /// The choices with more than one candidate this run met after the given ones.
    fn forks(&self) -> &[(u8, u8)] {
        &self.open[..usize::from(self.n_open)]
    }
}

/// Where the text is: every reading of it the grammar allows so far — more than one only
/// after a byte that several `anyOf` alternatives can start with (two objects, a string or
/// an enum, `integer` or `number`), until the text tells them apart. At most 16,
/// never none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonPaths {
    states: Vec<JsonState>,
}

impl Default for JsonPaths {
    fn default() -> Self {
        JsonPaths {
            states: vec![JsonState::default()],
        }
    }
}

impl JsonPaths {
    /// Whether every reading is complete (only a stop token may follow).
    pub fn is_done(&self) -> bool {
        self.states.iter().all(JsonState::is_done)
    }

    /// Whether the text left the grammar for free text (no constraint from here on).
    pub fn is_free(&self) -> bool {
        self.states.iter().any(JsonState::is_free)
    }

    /// Whether the text may end here (some reading is complete, or could end).
    pub fn can_end(&self, g: &Grammar) -> bool {
        self.states.iter().any(|s| s.is_done() || s.can_end(g))
    }

    /// How many readings there are.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Never: there is always at least one reading.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Whether `bytes` keep the text a prefix of a value `g` allows.
    pub fn accepts(&self, g: &Grammar, bytes: &[u8]) -> bool {
        self.states.iter().any(|s| s.accepts(g, bytes))
    }

    /// The readings after `bytes`, if they keep the text a prefix of a value `g` allows.
    pub fn after_bytes(&self, g: &Grammar, bytes: &[u8]) -> Option<Self> {
        let mut cur = self.states.clone();
        let mut next = Vec::new();
        for &b in bytes {
            next.clear();
            for s in &cur {
                s.successors(g, b, &mut next);
            }
            if next.is_empty() {
                return None;
            }
            std::mem::swap(&mut cur, &mut next);
        }
        // Free text ends the constraint: no other reading matters.
        if let Some(&free) = cur.iter().find(|s| s.is_free()) {
            cur = vec![free];
        }
        Some(JsonPaths { states: cur })
    }
}

/// What a memoised allowed set depends on: the token table, the grammar, the reasoning tags
/// and the state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaskKey {
    tokens: u64,
    grammar: u64,
    tags: Option<Arc<ReasoningTags>>,
    gate: Gate,
    state: JsonPaths,
}

/// A thinking model's tags around its reasoning (`<think>`, `</think>`): text the
/// constraint lets through before the answer it holds to its grammar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReasoningTags {
    /// Opens the reasoning (at the very start of the text).
    pub open: Box<[u8]>,
    /// Closes it; the answer follows (after any whitespace).
    pub close: Box<[u8]>,
}

/// Where a text with [`ReasoningTags`] is, before its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Gate {
    /// The answer: the grammar holds.
    Answer,
    /// At the start: the first `n` bytes of the opening tag written (any other first byte
    /// begins the answer).
    Opening(u8),
    /// Inside the reasoning, free text: the last `n` bytes are the closing tag's first.
    Thinking(u8),
    /// Just after the closing tag: whitespace, then the answer.
    Gap,
    /// A lazy grammar's free text (see [`Grammar::named_calls`]): the last `n` bytes are
    /// its trigger's first.
    Waiting(u8),
}

/// How much of `tag` the text ends with after `b`, when it ended with `n` of its bytes.
fn tag_step(tag: &[u8], n: usize, b: u8) -> usize {
    let mut n = n;
    loop {
        if tag.get(n) == Some(&b) {
            return n + 1;
        }
        if n == 0 {
            return 0;
        }
        // The longest shorter tail of `tag[..n]` that begins the tag (tags are short).
        n = (1..n)
            .rev()
            .find(|&k| tag[..k] == tag[n - k..n])
            .unwrap_or(0);
    }
}

/// Where the answer starts: held to the grammar, or (a lazy grammar) free text that waits
/// for its trigger. (Trigger positions are counted in a byte: a trigger of 256 bytes or
/// more is held from the start.)
fn answer_gate(g: &Grammar) -> Gate {
    match g.trigger.as_deref() {
        Some(t) if (1..256).contains(&t.len()) => Gate::Waiting(0),
        _ => Gate::Answer,
    }
}

/// One sequence's JSON-mode constraint: the token table, the grammar (a schema, or any
/// object), where the text is, and (for a thinking model) the reasoning it may write first.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    tokens: Arc<TokenBytes>,
    grammar: Arc<Grammar>,
    tags: Option<Arc<ReasoningTags>>,
    gate: Gate,
    state: JsonPaths,
}

impl JsonConstraint {
    /// At the start of the generated text.
    pub fn new(tokens: Arc<TokenBytes>, grammar: Arc<Grammar>) -> Self {
        let gate = answer_gate(&grammar);
        JsonConstraint {
            tokens,
            grammar,
            tags: None,
            gate,
            state: JsonPaths::default(),
        }
    }

    /// The same constraint for a thinking model: the text may first be its reasoning —
    /// free text from `tags.open` (at the very start; `inside`: the prompt already opened
    /// it) to `tags.close` — and the grammar then holds from the first byte after the
    /// closing tag and its whitespace. Stop tokens wait for the answer.
    pub fn after_reasoning(mut self, tags: Arc<ReasoningTags>, inside: bool) -> Self {
        // (Tag positions are counted in a byte.)
        if !(1..256).contains(&tags.open.len()) || !(1..256).contains(&tags.close.len()) {
            return self;
        }
        self.gate = if inside {
            Gate::Thinking(0)
        } else {
            Gate::Opening(0)
        };
        self.tags = Some(tags);
        self
    }

    /// Whether the value is complete (only a stop token may follow).
    pub fn is_done(&self) -> bool {
        self.gate == Gate::Answer && self.state.is_done()
    }

    /// Whether the text is the answer and left the grammar for free text.
    fn is_free(&self) -> bool {
        self.gate == Gate::Answer && self.state.is_free()
    }

    /// What the allowed set depends on, while the value is open (and not free text).
    pub fn key(&self) -> Option<MaskKey> {
        (!self.is_done() && !self.is_free()).then(|| MaskKey {
            tokens: self.tokens.id,
            grammar: self.grammar.id,
            tags: self.tags.clone(),
            gate: self.gate,
            state: self.state.clone(),
        })
    }

    /// The allowed set of the current state, computed (not remembered).
    pub fn allowed(&self) -> Vec<u64> {
        if self.gate == Gate::Answer {
            return self.tokens.allowed(&self.grammar, &self.state);
        }
        let mut set = vec![0u64; self.tokens.bytes.len().div_ceil(64)];
        for (id, b) in self.tokens.bytes.iter().enumerate() {
            let fits = match b {
                Some(b) => self.after(b).is_some(),
                // Special tokens and pieces of characters: free text, not the answer's.
                None => matches!(self.gate, Gate::Thinking(_) | Gate::Waiting(_)),
            };
            if fits {
                set[id / 64] |= 1 << (id % 64);
            }
        }
        set
    }

    /// Where the text is after `bytes` (`None`: they break the answer).
    fn after(&self, bytes: &[u8]) -> Option<(Gate, JsonPaths)> {
        let (mut gate, mut state) = (self.gate, self.state.clone());
        if gate == Gate::Answer {
            return Some((gate, state.after_bytes(&self.grammar, bytes)?));
        }
        let no_tags = ReasoningTags {
            open: Box::default(),
            close: Box::default(),
        };
        let tags = self.tags.as_deref().unwrap_or(&no_tags);
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match gate {
                Gate::Answer => {
                    state = state.after_bytes(&self.grammar, &bytes[i..])?;
                    break;
                }
                Gate::Waiting(n) => {
                    let trigger = self.grammar.trigger.as_deref().unwrap_or_default();
                    let n = tag_step(trigger, usize::from(n), b);
                    i += 1;
                    if n == trigger.len() {
                        // The trigger begins the grammar's value.
                        state = JsonPaths::default().after_bytes(&self.grammar, trigger)?;
                        gate = Gate::Answer;
                    } else {
                        gate = Gate::Waiting(n as u8);
                    }
                }
                Gate::Opening(n) => {
                    let n = usize::from(n);
                    if tags.open[n] == b {
                        gate = if n + 1 == tags.open.len() {
                            Gate::Thinking(0)
                        } else {
                            Gate::Opening((n + 1) as u8)
                        };
                        i += 1;
                    } else {
                        // Not the tag after all: its bytes so far begin the answer.
                        state = state.after_bytes(&self.grammar, &tags.open[..n])?;
                        gate = Gate::Answer;
                    }
                }
                Gate::Thinking(n) => {
                    let n = tag_step(&tags.close, usize::from(n), b);
                    gate = if n == tags.close.len() {
                        Gate::Gap
                    } else {
                        Gate::Thinking(n as u8)
                    };
                    i += 1;
                }
                Gate::Gap if b.is_ascii_whitespace() => i += 1,
                Gate::Gap => gate = answer_gate(&self.grammar),
            }
        }
        Some((gate, state))
    }

    /// Sets the logits of every token that cannot come next to −∞: once the value is
    /// complete all but `stop_ids`, before that every token whose bytes would break it, and
    /// the stop ids unless the text may end here (a top-level number). Should no token fit
    /// (a vocabulary without the needed bytes), the stop ids stay allowed: the text ends
    /// rather than breaking the JSON.
    /// `allowed`: the state's set ([`Self::allowed`], remembered by the caller); ignored once
    /// the value is complete.
    pub fn mask(&self, logits: &mut [f32], stop_ids: &[u32], allowed: &[u64]) {
        if self.is_free() {
            return;
        }
        let done = self.is_done();
        let fits = |id: usize| {
            !done
                && allowed
                    .get(id / 64)
                    .is_some_and(|w| w >> (id % 64) & 1 == 1)
        };
        // Free text waiting for a trigger may end too.
        let stop_ok = match self.gate {
            Gate::Answer => self.state.can_end(&self.grammar),
            Gate::Waiting(_) => true,
            _ => false,
        } || !(0..logits.len()).any(fits);
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = if stop_ids.contains(&(id as u32)) {
                stop_ok
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
        match self.tokens.bytes.get(id as usize) {
            Some(Some(b)) => {
                if let Some((gate, s)) = self.after(b) {
                    self.gate = gate;
                    self.state = s;
                }
            }
            // A token without text inside the reasoning breaks a closing tag begun.
            _ if matches!(self.gate, Gate::Thinking(_)) => self.gate = Gate::Thinking(0),
            _ if matches!(self.gate, Gate::Waiting(_)) => self.gate = Gate::Waiting(0),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &str) -> Option<JsonPaths> {
        accepts_bytes(text.as_bytes())
    }

    fn accepts_bytes(bytes: &[u8]) -> Option<JsonPaths> {
        JsonPaths::default().after_bytes(&Grammar::any_object(), bytes)
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
                let p = accepts_bytes(&t.as_bytes()[..i]);
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
        // The root frame and the object's, then arrays up to the limit.
        let deep = format!("{{\"a\": {}", "[".repeat(MAX_FRAMES - 2));
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
        let mut c = JsonConstraint::new(table, Arc::new(Grammar::any_object()));
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
        let stuck = JsonConstraint::new(
            Arc::new(TokenBytes::from_texts(&[Some("{"), None])),
            Arc::new(Grammar::any_object()),
        );
        let mut c = stuck.clone();
        c.advance(0);
        let mut l = vec![0f32; 2];
        c.mask(&mut l, &[1], &c.allowed());
        assert_eq!(l, vec![f32::NEG_INFINITY, 0.0]);
        // Closing an object leaves the same state as never having opened it.
        let a = accepts(r#"{"a": {"x": 1}, "b": 2"#);
        let b = accepts(r#"{"a": 1, "b": 2"#);
        assert_eq!(a, b);
    }

    /// The ids of a table of `n` tokens that the constraint lets through (`stop`: the stop
    /// token's id).
    fn allowed_ids(c: &JsonConstraint, n: usize, stop: u32) -> Vec<usize> {
        let mut l = vec![0f32; n];
        c.mask(&mut l, &[stop], &c.allowed());
        (0..n).filter(|&i| l[i] == 0.0).collect()
    }

    /// The constraint after these tokens.
    fn after(c: &JsonConstraint, ids: &[u32]) -> JsonConstraint {
        let mut c = c.clone();
        for &id in ids {
            c.advance(id);
        }
        c
    }

    #[test]
    fn tag_steps_follow_overlapping_beginnings() {
        let tag = b"abab!";
        let mut n = 0;
        for &b in b"xabababab!" {
            n = tag_step(tag, n, b);
        }
        assert_eq!(n, 5);
        assert_eq!(tag_step(b"</think>", 3, b'<'), 1);
        assert_eq!(tag_step(b"</think>", 3, b'x'), 0);
    }

    /// A thinking model's constraint: reasoning first (free text, the tags whole or in
    /// pieces), then the grammar from the first byte after the closing tag's whitespace.
    #[test]
    fn reasoning_goes_free_before_the_answer_is_held() {
        let texts = [
            Some("{"),          // 0
            Some("}"),          // 1
            Some("<think>"),    // 2
            Some("</think>"),   // 3
            Some("<"),          // 4
            Some("think"),      // 5
            Some(">"),          // 6
            Some("hello"),      // 7
            Some("\n\n"),       // 8
            Some("</"),         // 9
            Some("</think>{}"), // 10
            None,               // 11: a special token (stop)
            None,               // 12: a piece of a character
            Some("</think>x"),  // 13
        ];
        let n = texts.len();
        let table = Arc::new(TokenBytes::from_texts(&texts));
        let tags = Arc::new(ReasoningTags {
            open: b"<think>"[..].into(),
            close: b"</think>"[..].into(),
        });
        let base = JsonConstraint::new(table, Arc::new(Grammar::any_object()));
        let allowed = |c: &JsonConstraint| allowed_ids(c, n, 11);
        let c = base.clone().after_reasoning(tags.clone(), false);
        // The start: the answer (`{`) or the opening tag, whole or begun; the grammar's
        // whitespace.
        assert_eq!(allowed(&c), vec![0, 2, 4, 8]);
        assert_eq!(allowed(&after(&c, &[4])), vec![5]);
        // Inside: anything but a stop token, or a closing tag followed by what is no answer.
        let inside = after(&c, &[4, 5, 6]);
        assert_eq!(allowed(&inside), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]);
        assert_eq!(allowed(&after(&c, &[2])), allowed(&inside));
        assert!(!inside.is_done());
        // A closing tag in pieces, a special token in between breaks it.
        let broken = after(&inside, &[9, 12, 5, 6]);
        assert_eq!(allowed(&broken), allowed(&inside));
        let closed = after(&inside, &[7, 9, 5, 6, 8]);
        assert_eq!(allowed(&closed), vec![0, 8]);
        // The closing tag and the answer in one token.
        let done = after(&inside, &[10]);
        assert!(done.is_done());
        assert_eq!(allowed(&done), vec![11]);
        // The prompt opened the reasoning; the answer straight away needs no tags.
        let open = base.clone().after_reasoning(tags, true);
        assert_eq!(allowed(&open), allowed(&inside));
        assert!(after(&c, &[0, 1]).is_done());
        assert_eq!(allowed(&after(&base, &[0])), vec![1, 8]);
    }

    /// Hermes calls: `<tool_call>`, a declared name first, arguments to its schema, then
    /// `</tool_call>`; with text allowed, an answer that does not open with `<` is free.
    #[test]
    fn hermes_calls_are_held_to_their_format() {
        use crate::engine::json_schema::CallShape;
        let schema: serde_json::Value = serde_json::json!({"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": false});
        let tools = [("get_weather", Some(&schema)), ("get_time", None)];
        let g = Grammar::named_calls(&tools, &CallShape::HERMES, false, 1).expect("grammar");
        let run = |g: &Grammar, t: &str| JsonPaths::default().after_bytes(g, t.as_bytes());
        for ok in [
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "<tool_call>\n{\"name\":\"get_time\",\"arguments\":{\"zone\": [1]}}\n</tool_call>",
        ] {
            assert!(run(&g, ok).is_some_and(|s| s.is_done()), "{ok}");
        }
        for bad in [
            "{\"name\": \"get_weather\"",
            " <tool_call>",
            "<tool_call>{",
            "<tool_call>\n{\"name\": \"get_news\"",
            "<tool_call>\n{\"arguments\": {}",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 1",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>x",
        ] {
            assert!(run(&g, bad).is_none(), "{bad}");
        }
        // With text allowed the grammar is lazy: the same calls, armed by `<tool_call>`.
        let auto = Grammar::named_calls(&tools, &CallShape::HERMES, true, 1).expect("grammar");
        assert_eq!(auto.trigger.as_deref(), Some(&b"<tool_call>"[..]));
        assert!(run(&auto, "<tool_call>\n{\"name\": \"get_time\"").is_some());
        assert!(run(&auto, "Hello").is_none());
        // Past 16 functions, one reading: any declared name, arguments any object.
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let many: Vec<(&str, Option<&serde_json::Value>)> =
            names.iter().map(|n| (n.as_str(), Some(&schema))).collect();
        let g = Grammar::named_calls(&many, &CallShape::HERMES, false, 1).expect("grammar");
        let call = |n: &str| {
            format!("<tool_call>\n{{\"name\": \"{n}\", \"arguments\": {{\"x\": 1}}}}\n</tool_call>")
        };
        assert!(run(&g, &call("f19")).is_some_and(|s| s.is_done()));
        assert!(run(&g, &call("f20")).is_none());
        // Parallel calls: up to the most, a newline apart; each may end the answer.
        let g = Grammar::named_calls(&many, &CallShape::HERMES, false, 3).expect("grammar");
        let two = format!("{}\n{}", call("f1"), call("f2"));
        let after = run(&g, &two).expect("two calls");
        assert!(!after.is_done(), "done");
        assert!(after.can_end(&g), "cannot end");
        let three = format!("{two}\n{}", call("f3"));
        assert!(run(&g, &three).is_some_and(|s| s.is_done()));
        assert!(run(&g, &format!("{three}\n")).is_none());
        assert!(run(&g, &format!("{}{}", call("f1"), call("f2"))).is_none());
    }

    /// A lazy grammar (Hermes calls with text allowed): free text, stop tokens included, until
    /// `<tool_call>` — whole, in pieces, after text or at the start, a special token breaking
    /// it — and from there the call; a token that completes the tag with bytes that break the
    /// call is held back; after a thinking model's reasoning, the same.
    #[test]
    fn lazy_calls_wait_for_their_tag() {
        use crate::engine::json_schema::CallShape;
        let texts = [
            Some("Sure."),                // 0
            Some("<tool_call>"),          // 1
            Some("<tool"),                // 2
            Some("_call>"),               // 3
            Some("\n{\"name\": \"f\", "), // 4
            Some("\"arguments\": {}}"),   // 5
            Some("\n</tool_call>"),       // 6
            None,                         // 7: a special token (stop)
            Some("<tool_call>x"),         // 8
            Some(" <tool_call>\n{"),      // 9
            Some("<"),                    // 10
        ];
        let n = texts.len();
        let table = Arc::new(TokenBytes::from_texts(&texts));
        let g = Grammar::named_calls(&[("f", None)], &CallShape::HERMES, true, 1).expect("g");
        let base = JsonConstraint::new(table, Arc::new(g));
        let allowed = |c: &JsonConstraint| allowed_ids(c, n, 7);
        // Free text: anything but the tag followed by what is no call; the text may end.
        let free = vec![0, 1, 2, 3, 4, 5, 6, 7, 9, 10];
        assert_eq!(allowed(&base), free);
        assert!(base.key().is_some() && !base.is_done());
        assert_eq!(allowed(&after(&base, &[0])), free);
        // The tag, whole or in pieces, after text or not: the call's next bytes only.
        for ids in [&[1][..], &[0, 1], &[2, 3], &[0, 10, 2, 3]] {
            assert_eq!(allowed(&after(&base, ids)), vec![4], "{ids:?}");
        }
        // A token that ends the tag and opens the call: held from there (no token of this
        // table writes `"name"` next, so only the stop token is left).
        assert_eq!(allowed(&after(&base, &[9])), vec![7]);
        // A special token breaks a tag begun.
        assert_eq!(allowed(&after(&base, &[2, 7])), free);
        let done = after(&base, &[0, 1, 4, 5, 6]);
        assert!(done.is_done());
        assert_eq!(allowed(&done), vec![7]);
        // After a thinking model's reasoning the answer waits for the tag the same way.
        let tags = Arc::new(ReasoningTags {
            open: b"<think>"[..].into(),
            close: b"</think>"[..].into(),
        });
        let thinking = base.clone().after_reasoning(tags.clone(), true);
        // Inside the reasoning the tag is free text, and the text may not stop.
        let inside = after(&thinking, &[1, 4]);
        assert!(!allowed(&inside).contains(&7) && allowed(&inside).contains(&8));
        let table = Arc::new(TokenBytes::from_texts(&[
            Some("</think>\n\n"),
            Some("Sure."),
        ]));
        let g = Grammar::named_calls(&[("f", None)], &CallShape::HERMES, true, 1).expect("g");
        let mut c = JsonConstraint::new(table, Arc::new(g)).after_reasoning(tags, true);
        c.advance(0);
        c.advance(1);
        assert_eq!(c.gate, Gate::Waiting(0));
        assert!(c.key().is_some() && !c.is_done());
    }

    /// Llama 3.x calls: a bare `{"name": …, "parameters": {…}}`, nothing before or after it;
    /// with text allowed, an answer that does not open with `{` is free.
    #[test]
    fn llama_calls_are_held_to_their_format() {
        use crate::engine::json_schema::CallShape;
        let schema: serde_json::Value = serde_json::json!({"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": false});
        let tools = [("get_weather", Some(&schema)), ("get_time", None)];
        let g = Grammar::named_calls(&tools, &CallShape::LLAMA, false, 1).expect("grammar");
        let run = |g: &Grammar, t: &str| JsonPaths::default().after_bytes(g, t.as_bytes());
        for ok in [
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            "{\"name\":\"get_time\",\"parameters\":{}}",
        ] {
            assert!(run(&g, ok).is_some_and(|s| s.is_done()), "{ok}");
        }
        for bad in [
            " {",
            "<tool_call>",
            "{\"name\": \"get_weather\", \"arguments\"",
            "{\"parameters\": {}",
            "{\"name\": \"get_weather\", \"parameters\": {\"town\"",
            "{\"name\": \"get_time\", \"parameters\": {}}; ",
        ] {
            assert!(run(&g, bad).is_none(), "{bad}");
        }
        let auto = Grammar::named_calls(&tools, &CallShape::LLAMA, true, 1).expect("grammar");
        assert!(run(&auto, "Paris is sunny {").is_some_and(|s| s.is_free()));
        assert!(run(&auto, "{\"name\": \"get_time\"").is_some_and(|s| !s.is_free()));
    }

    /// Mistral's calls: one JSON array after `[TOOL_CALLS]` (with the space of its 'v3'
    /// templates or without, 'v3-tekken'), calls `, ` apart, nothing after the `]`; the tag
    /// may be one special token (its text in the table); with text allowed, free text until
    /// the tag, then held.
    #[test]
    fn mistral_calls_are_one_array_after_their_tag() {
        use crate::engine::json_schema::CallShape;
        let schema: serde_json::Value = serde_json::json!({"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": false});
        let tools = [("get_weather", Some(&schema)), ("get_time", None)];
        let run = |g: &Grammar, t: &str| JsonPaths::default().after_bytes(g, t.as_bytes());
        let weather = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        let time = "{\"name\": \"get_time\", \"arguments\": {}}";
        for (shape, tag) in [
            (&CallShape::MISTRAL, "[TOOL_CALLS] ["),
            (&CallShape::MISTRAL_TEKKEN, "[TOOL_CALLS]["),
        ] {
            let g = Grammar::named_calls(&tools, shape, false, 8).expect("grammar");
            for ok in [
                format!("{tag}{weather}]"),
                format!("{tag}{weather}, {time}]"),
            ] {
                assert!(run(&g, &ok).is_some_and(|s| s.is_done()), "{ok}");
            }
            let unclosed = run(&g, &format!("{tag}{weather}")).expect("a call");
            assert!(!unclosed.can_end(&g));
            for bad in [
                format!("{tag}{weather}]]"),
                format!("{tag}]"),
                format!("{tag}{weather}{time}]"),
                format!("{tag}{{\"name\": \"get_weather\", \"parameters\""),
                format!("<tool_call>{weather}"),
                weather.to_owned(),
            ] {
                assert!(run(&g, &bad).is_none(), "{bad}");
            }
            let one = Grammar::named_calls(&tools, shape, false, 1).expect("grammar");
            assert!(run(&one, &format!("{tag}{weather}, ")).is_none());
        }
        // The tag as one special token: the only first token of a required call, and the
        // trigger of a lazy one.
        let texts = [
            Some("[TOOL_CALLS]"),                                // 0
            Some(" ["),                                          // 1
            Some("{\"name\": \"get_time\", \"arguments\": {}}"), // 2
            Some("]"),                                           // 3
            Some("Sure."),                                       // 4
            None,                                                // 5: stop
        ];
        let table = Arc::new(TokenBytes::from_texts(&texts));
        let required = Grammar::named_calls(&tools, &CallShape::MISTRAL, false, 8).expect("g");
        let c = JsonConstraint::new(table.clone(), Arc::new(required));
        assert_eq!(allowed_ids(&c, texts.len(), 5), vec![0]);
        let done = after(&c, &[0, 1, 2, 3]);
        assert!(done.is_done());
        assert_eq!(allowed_ids(&done, texts.len(), 5), vec![5]);
        let lazy = Grammar::named_calls(&tools, &CallShape::MISTRAL, true, 8).expect("g");
        let c = JsonConstraint::new(table, Arc::new(lazy));
        assert_eq!(allowed_ids(&c, texts.len(), 5), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(allowed_ids(&after(&c, &[4, 0]), texts.len(), 5), vec![1]);
    }
}
