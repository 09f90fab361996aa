//! Regular expressions the generated text must match: a JSON string's `pattern` (or a
//! `format` such as `date-time`, written as a pattern) and vLLM's regex-constrained answers.
//!
//! A pattern is compiled once into a dense DFA over bytes (`regex-automata`) and, beside it,
//! the set of *live* positions: a DFA state, where the bytes are inside a UTF-8 character and
//! how many characters were written, from which some valid UTF-8 continuation reaches a match
//! within the length bounds. The recogniser lets a byte through only onto a live position, so
//! a constrained string never reaches a dead end: it can always be finished.
//!
//! Semantics are JSON Schema's: the string is valid when the pattern matches *somewhere* in it
//! (`^…$` to match all of it). Once a match has been seen the rest of the string is free. The
//! dialect is ECMA-262's common subset as Rust's `regex` reads it; `\d`, `\w` (and `\D`, `\W`,
//! `\b`, `\B`) are ASCII as in ECMA-262. Look-around and back-references cannot be followed
//! and are refused when the pattern is compiled.

use std::collections::{HashMap, HashSet, VecDeque};

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use super::json_schema::UNBOUNDED;

/// Largest DFA (bytes) a pattern may compile to.
const DFA_LIMIT: usize = 4 << 20;
/// Most positions (DFA state × UTF-8 progress × length) the liveness analysis visits.
const MAX_POSITIONS: usize = 400_000;

/// Where a pattern's match stands after some bytes: the DFA state (or [`MATCHED`] once a
/// match was seen) in the low 28 bits, the UTF-8 progress ([`utf8_next`], 0 between
/// characters) above them — one word, so the recogniser's string frame stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct PatPos(u32);

/// A match has been seen: the rest is free.
const MATCHED: u32 = (1 << 28) - 1;

impl PatPos {
    fn new(dfa: u32, utf8: u8) -> PatPos {
        PatPos(dfa | u32::from(utf8) << 28)
    }

    fn dfa(self) -> u32 {
        self.0 & MATCHED
    }

    fn utf8(self) -> u8 {
        (self.0 >> 28) as u8
    }
}

/// Hashes the liveness sets' small integer keys with one multiply (they are looked up for
/// every byte of every token tried against a pattern).
#[derive(Default, Clone, Copy)]
struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_u64(u64::from(b)));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(29) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PosSet = HashSet<(PatPos, u32), std::hash::BuildHasherDefault<WordHasher>>;

/// A compiled pattern with its length bounds (characters, [`UNBOUNDED`] for no maximum).
pub(crate) struct Pattern {
    /// The pattern as given (part of the grammar's identity).
    pub source: String,
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    min: u32,
    max: u32,
    /// Lengths are told apart up to here (the maximum if any, else the minimum).
    cap: u32,
    live: PosSet,
    /// Live positions where the string may end and no byte can follow.
    finals: PosSet,
}

impl std::hash::Hash for Pattern {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (&self.source, self.min, self.max).hash(h);
    }
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pattern({:?}, {}..{})", self.source, self.min, self.max)
    }
}

/// UTF-8 progress after byte `b` (`None`: `b` cannot come here). States: 0 between
/// characters; 1, 2, 3 continuation bytes due; 4–7 the restricted second bytes after E0, ED,
/// F0 and F4 (no overlong forms, no surrogates, nothing above U+10FFFF).
fn utf8_next(state: u8, b: u8) -> Option<u8> {
    let cont = (0x80..=0xBF).contains(&b);
    Some(match state {
        0 => match b {
            0x00..=0x7F => 0,
            0xC2..=0xDF => 1,
            0xE0 => 4,
            0xE1..=0xEC | 0xEE..=0xEF => 2,
            0xED => 5,
            0xF0 => 6,
            0xF1..=0xF3 => 3,
            0xF4 => 7,
            _ => return None,
        },
        1..=3 if cont => state - 1,
        4 if (0xA0..=0xBF).contains(&b) => 1,
        5 if (0x80..=0x9F).contains(&b) => 1,
        6 if (0x90..=0xBF).contains(&b) => 2,
        7 if (0x80..=0x8F).contains(&b) => 2,
        _ => return None,
    })
}

/// A class of bytes [`utf8_next`] treats alike (for the liveness walk).
fn utf8_class(b: u8) -> u8 {
    match b {
        0x00..=0x7F => 0,
        0x80..=0x8F => 1,
        0x90..=0x9F => 2,
        0xA0..=0xBF => 3,
        0xC2..=0xDF => 4,
        0xE0 => 5,
        0xE1..=0xEC | 0xEE..=0xEF => 6,
        0xED => 7,
        0xF0 => 8,
        0xF1..=0xF3 => 9,
        0xF4 => 10,
        _ => 11,
    }
}

/// ECMA-262's ASCII classes in the syntax Rust's `regex` reads, and `\/` unescaped.
fn translate(ecma: &str) -> String {
    let mut out = String::with_capacity(ecma.len() + 16);
    let mut in_class = false;
    let mut chars = ecma.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(n) = chars.next() else {
                    out.push('\\');
                    break;
                };
                let sub = match (n, in_class) {
                    ('d', false) => "[0-9]",
                    ('D', false) => "[^0-9]",
                    ('w', false) => "[0-9A-Za-z_]",
                    ('W', false) => "[^0-9A-Za-z_]",
                    ('b', false) => r"(?-u:\b)",
                    ('B', false) => r"(?-u:\B)",
                    ('d', true) => "0-9",
                    ('w', true) => "0-9A-Za-z_",
                    ('D', true) => "[:^digit:]",
                    ('W', true) => "[:^word:]",
                    ('/', _) => "/",
                    _ => {
                        out.push('\\');
                        out.push(n);
                        continue;
                    }
                };
                out.push_str(sub);
            }
            '[' if !in_class => {
                in_class = true;
                out.push(c);
                // `[]` and `[^]` as the class's first character are literal in neither
                // dialect the same way; Rust reads `[]…]` as starting with `]`.
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

impl Pattern {
    /// Compiles `source` for strings of `min` to `max` characters. The error says why it
    /// cannot be followed (syntax, an unsupported construct, too large, or no string of
    /// those lengths matches).
    pub fn new(source: &str, min: u32, max: u32) -> Result<Pattern, String> {
        Self::labeled(source, &format!("the pattern {source:?}"), min, max)
    }

    /// [`Self::new`], with `what` naming the pattern in errors (a grammar's regular
    /// expression is no help to its author).
    pub fn labeled(source: &str, what: &str, min: u32, max: u32) -> Result<Pattern, String> {
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Unanchored)
                    .match_kind(MatchKind::LeftmostFirst)
                    .dfa_size_limit(Some(DFA_LIMIT))
                    .determinize_size_limit(Some(DFA_LIMIT)),
            )
            .build(&translate(source))
            .map_err(|e| {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("").trim();
                format!("{what} cannot be followed: {first}")
            })?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::No))
            .map_err(|e| format!("{what} cannot be followed: {e}"))?;
        let cap = if max == UNBOUNDED { min } else { max };
        // The recogniser counts a string's characters in 16 bits.
        if cap > u32::from(u16::MAX) {
            return Err(format!(
                "lengths above {} beside {what} are not supported",
                u16::MAX
            ));
        }
        let mut p = Pattern {
            source: source.to_owned(),
            dfa,
            start,
            min,
            max,
            cap,
            live: PosSet::default(),
            finals: PosSet::default(),
        };
        (p.live, p.finals) = p.live_positions()?;
        if !p.live.contains(&(p.start(), 0)) {
            return Err(format!("no string of the allowed lengths matches {what}"));
        }
        Ok(p)
    }

    /// Before the first byte.
    pub fn start(&self) -> PatPos {
        PatPos::new(self.start.as_u32(), 0)
    }

    fn state(&self, id: u32) -> StateID {
        // Only ids the DFA gave out are stored.
        StateID::new(id as usize).unwrap_or(self.start)
    }

    /// The position after byte `b` when `len` characters were complete before it, without
    /// the liveness check: `None` if `b` breaks UTF-8, the length bound or the DFA.
    fn advance(&self, p: PatPos, len: u32, b: u8) -> Option<(PatPos, u32)> {
        let utf8 = utf8_next(p.utf8(), b)?;
        let len = if utf8 == 0 {
            if len >= self.max {
                return None;
            }
            (len + 1).min(self.cap)
        } else {
            len
        };
        let dfa = if p.dfa() == MATCHED {
            MATCHED
        } else {
            let next = self.dfa.next_state(self.state(p.dfa()), b);
            if self.dfa.is_match_state(next) {
                MATCHED
            } else if self.dfa.is_dead_state(next) || self.dfa.is_quit_state(next) {
                return None;
            } else if next.as_u32() >= MATCHED {
                // Beyond what the size limit lets a DFA reach; never taken.
                return None;
            } else {
                next.as_u32()
            }
        };
        Some((PatPos::new(dfa, utf8), len))
    }

    /// The position after byte `b` (with `len` characters complete before it), if the string
    /// can still be finished from there.
    pub fn step(&self, p: PatPos, len: u32, b: u8) -> Option<(PatPos, u32)> {
        let len = len.min(self.cap);
        let next = self.advance(p, len, b)?;
        self.live.contains(&next).then_some(next)
    }

    /// [`Self::step`] over the UTF-8 bytes of `c`.
    pub fn step_char(&self, mut p: PatPos, mut len: u32, c: char) -> Option<(PatPos, u32)> {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            (p, len) = self.step(p, len, b)?;
        }
        Some((p, len))
    }

    /// Whether the string is complete here: it may end and nothing can follow.
    pub fn is_final(&self, p: PatPos, len: u32) -> bool {
        self.finals.contains(&(p, len.min(self.cap)))
    }

    /// The bytes a matching string can start with.
    pub fn first_bytes(&self) -> Vec<u8> {
        (0..=255u8)
            .filter(|&b| self.step(self.start(), 0, b).is_some())
            .collect()
    }

    /// Whether the string may end here.
    pub fn accepts(&self, p: PatPos, len: u32) -> bool {
        let len = len.min(self.cap);
        p.utf8() == 0
            && len >= self.min
            && (p.dfa() == MATCHED
                || self
                    .dfa
                    .is_match_state(self.dfa.next_eoi_state(self.state(p.dfa()))))
    }

    /// Every position (with its capped length) from which an accepting one can be reached:
    /// all positions reachable from the start, walked over one byte of each class, then
    /// liveness spread backwards from the accepting ones.
    fn live_positions(&self) -> Result<(PosSet, PosSet), String> {
        // One representative byte per (DFA byte class, UTF-8 class).
        let classes = self.dfa.byte_classes();
        let mut seen_class = HashSet::new();
        let reps: Vec<u8> = (0..=255u8)
            .filter(|&b| utf8_class(b) != 11 && seen_class.insert((classes.get(b), utf8_class(b))))
            .collect();
        let mut index: HashMap<(PatPos, u32), usize, _> =
            HashMap::with_hasher(std::hash::BuildHasherDefault::<WordHasher>::default());
        let mut nodes: Vec<(PatPos, u32)> = Vec::new();
        let mut parents: Vec<Vec<usize>> = Vec::new();
        let first = (self.start(), 0);
        index.insert(first, 0);
        nodes.push(first);
        parents.push(Vec::new());
        let mut queue = VecDeque::from([0usize]);
        while let Some(i) = queue.pop_front() {
            let (p, len) = nodes[i];
            for &b in &reps {
                let Some(child) = self.advance(p, len, b) else {
                    continue;
                };
                let j = match index.get(&child) {
                    Some(&j) => j,
                    None => {
                        if nodes.len() >= MAX_POSITIONS {
                            return Err(
                                "the pattern with these lengths is too complex to follow".into()
                            );
                        }
                        index.insert(child, nodes.len());
                        nodes.push(child);
                        parents.push(Vec::new());
                        queue.push_back(nodes.len() - 1);
                        nodes.len() - 1
                    }
                };
                if parents[j].last() != Some(&i) {
                    parents[j].push(i);
                }
            }
        }
        let mut live = vec![false; nodes.len()];
        let mut stack: Vec<usize> = (0..nodes.len())
            .filter(|&i| self.accepts(nodes[i].0, nodes[i].1))
            .collect();
        for &i in &stack {
            live[i] = true;
        }
        while let Some(i) = stack.pop() {
            for &j in &parents[i] {
                if !live[j] {
                    live[j] = true;
                    stack.push(j);
                }
            }
        }
        let mut goes_on = vec![false; nodes.len()];
        for (j, ps) in parents.iter().enumerate() {
            if live[j] {
                ps.iter().for_each(|&i| goes_on[i] = true);
            }
        }
        let finals = (0..nodes.len())
            .filter(|&i| live[i] && !goes_on[i])
            .map(|i| nodes[i])
            .collect();
        let live = (0..nodes.len())
            .filter(|&i| live[i])
            .map(|i| nodes[i])
            .collect();
        Ok((live, finals))
    }
}

/// The pattern a string `format` stands for (the formats OpenAI's structured outputs
/// follow); `None` for other formats, which stay annotations.
pub(crate) fn format_pattern(format: &str) -> Option<&'static str> {
    Some(match format {
        // Real calendar dates (leap years included) from year 1, times without leap
        // seconds and with at most microseconds, `T` and `Z` upper-case: what
        // RFC 3339 allows and Python's `datetime` (pydantic) and most parsers also read.
        "date" => {
            r"^(([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)|([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)$"
        }
        "time" => {
            r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
        }
        "date-time" => {
            r"^(([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)|([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
        }
        "uuid" => r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        "email" => {
            r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,63}$"
        }
        "hostname" => {
            r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
        }
        "ipv4" => {
            r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$"
        }
        "ipv6" => {
            r"^(([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,7}:|([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}|([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}|([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}|[0-9a-fA-F]{1,4}:(:[0-9a-fA-F]{1,4}){1,6}|:((:[0-9a-fA-F]{1,4}){1,7}|:))$"
        }
        "duration" => {
            r"^P(([0-9]+Y([0-9]+M)?([0-9]+D)?|[0-9]+M([0-9]+D)?|[0-9]+D)(T([0-9]+H([0-9]+M)?([0-9]+(\.[0-9]+)?S)?|[0-9]+M([0-9]+(\.[0-9]+)?S)?|[0-9]+(\.[0-9]+)?S))?|T([0-9]+H([0-9]+M)?([0-9]+(\.[0-9]+)?S)?|[0-9]+M([0-9]+(\.[0-9]+)?S)?|[0-9]+(\.[0-9]+)?S)|[0-9]+W)$"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(source: &str) -> Pattern {
        Pattern::new(source, 0, UNBOUNDED).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The position after `text`, if every byte of it is allowed.
    fn run(p: &Pattern, text: &str) -> Option<(PatPos, u32)> {
        text.bytes()
            .try_fold((p.start(), 0), |(pos, len), b| p.step(pos, len, b))
    }

    fn matches(p: &Pattern, text: &str) -> bool {
        run(p, text).is_some_and(|(pos, len)| p.accepts(pos, len))
    }

    #[test]
    fn anchored_patterns_allow_exactly_their_strings() {
        let p = pat(r"^\d{3}-\d{4}$");
        assert!(matches(&p, "555-1234"));
        assert!(run(&p, "555-123").is_some_and(|(pos, len)| !p.accepts(pos, len)));
        for bad in ["5a", "555-12345", "5551234", " 555", "٣"] {
            assert!(run(&p, bad).is_none(), "{bad}");
        }
        // After a full match nothing more fits.
        let (pos, len) = run(&p, "555-1234").expect("match");
        assert!((0..=255u8).all(|b| p.step(pos, len, b).is_none()));
        // Classes and alternatives.
        let p = pat(r"^(red|green|[A-F]{2}\w)$");
        for good in ["red", "green", "AB_", "FF9"] {
            assert!(matches(&p, good), "{good}");
        }
        for bad in ["re", "blue", "AG1", "ABé"] {
            assert!(!matches(&p, bad), "{bad}");
        }
    }

    #[test]
    fn unanchored_patterns_need_a_match_somewhere() {
        let p = pat("ab+c");
        assert!(matches(&p, "abc"));
        assert!(matches(&p, "xx abbbc yy"));
        assert!(matches(&p, "abc\u{e9}\u{1F600}"));
        for open in ["", "xx", "ab", "abbb", "a c"] {
            let (pos, len) = run(&p, open).unwrap_or_else(|| panic!("{open}"));
            assert!(!p.accepts(pos, len), "{open}");
        }
        // `^` only at the start, `$` only at the end.
        let p = pat("^ab");
        assert!(matches(&p, "abzz") && run(&p, "zab").is_none());
        let p = pat("ab$");
        assert!(matches(&p, "zzab") && !matches(&p, "abz"));
    }

    #[test]
    fn characters_are_whole_utf8_and_counted() {
        let p = pat("^[α-ω]+$");
        assert!(matches(&p, "αβγ"));
        assert!(run(&p, "a").is_none());
        // Invalid UTF-8 never passes, in or outside the pattern's characters.
        let any = pat(".*");
        for bad in [&[0xC0u8, 0x80][..], &[0xED, 0xA0, 0x80], &[0xF5], &[0x80]] {
            let r = bad
                .iter()
                .try_fold((any.start(), 0), |(pos, len), &b| any.step(pos, len, b));
            assert!(r.is_none(), "{bad:?}");
        }
        // Lengths in characters: 2 to 3 of them.
        let p = Pattern::new("^[a-zé]+$", 2, 3).expect("compiles");
        assert!(!matches(&p, "é") && matches(&p, "éé") && matches(&p, "aéa"));
        assert!(run(&p, "aéaa").is_none());
        let (pos, len) = run(&p, "é").expect("prefix");
        assert_eq!(len, 1);
        assert!(p
            .step_char(pos, len, 'b')
            .is_some_and(|(q, l)| p.accepts(q, l)));
    }

    #[test]
    fn no_walk_reaches_a_dead_end() {
        // Random walks over allowed bytes: from every position some byte goes on, or the
        // string may end there.
        let patterns: [(&str, u32, u32); 6] = [
            (r"^\d{3}-\d{4}$", 0, UNBOUNDED),
            ("ab+c", 0, 6),
            ("^(a|bc)*d?$", 3, 5),
            ("x", 4, UNBOUNDED),
            (r"^[\w.]+@[a-z]+\.(com|org)$", 0, 12),
            ("^(é|ü|€|😀)+$", 2, 4),
        ];
        let mut rand = crate::engine::xorshift(0x9E3779B97F4A7C15);
        for (source, min, max) in patterns {
            let p = Pattern::new(source, min, max).unwrap_or_else(|e| panic!("{e}"));
            for _ in 0..200 {
                let (mut pos, mut len) = (p.start(), 0);
                for _ in 0..40 {
                    let next: Vec<_> = (0..=255u8).filter_map(|b| p.step(pos, len, b)).collect();
                    assert!(
                        !next.is_empty() || p.accepts(pos, len),
                        "{source}: dead end at {pos:?} after {len} characters"
                    );
                    if next.is_empty() {
                        break;
                    }
                    (pos, len) = next[rand(next.len())];
                }
            }
        }
    }

    #[test]
    fn what_cannot_be_followed_is_refused() {
        for (source, min, max, why) in [
            ("(?=a)b", 0, UNBOUNDED, "look-around"),
            (r"(a)\1", 0, UNBOUNDED, "back-reference"),
            ("[a", 0, UNBOUNDED, "syntax"),
            ("^a{3}$", 0, 2, "no string"),
            ("^a{3}$", 4, UNBOUNDED, "no string"),
        ] {
            assert!(Pattern::new(source, min, max).is_err(), "{source}: {why}");
        }
    }

    #[test]
    fn formats_accept_their_values_only() {
        let cases: [(&str, &[&str], &[&str]); 9] = [
            (
                "date",
                &[
                    "2026-12-07",
                    "2000-02-29",
                    "2024-02-29",
                    "0001-01-01",
                    "2026-04-30",
                ],
                &[
                    "2026-13-01",
                    "2026-1-01",
                    "26-12-07",
                    "2026-02-29",
                    "1900-02-29",
                    "2026-04-31",
                    "2026-02-30",
                    "0000-01-01",
                ],
            ),
            (
                "date-time",
                &["2026-12-07T10:20:30Z", "2026-12-07T23:59:59.123456+05:30"],
                &[
                    "2026-12-07 10:20:30Z",
                    "2026-12-07T24:00:00Z",
                    "2026-12-07T10:20:30",
                    "2026-12-07T23:59:60Z",
                    "2026-12-07T10:20:30.1234567Z",
                ],
            ),
            (
                "time",
                &["08:30:00Z", "08:30:00.5-01:00"],
                &["8:30:00Z", "08:30Z"],
            ),
            (
                "uuid",
                &["123e4567-e89b-12d3-a456-426614174000"],
                &[
                    "123e4567e89b12d3a456426614174000",
                    "123e4567-e89b-12d3-a456-42661417400g",
                ],
            ),
            (
                "email",
                &["ada@example.com", "a.b+c@x-y.co.uk"],
                &["ada@", "@x.com", "a@b"],
            ),
            (
                "hostname",
                &["example.com", "localhost", "a-b.c9"],
                &["-a.com", "a..b", "a_b"],
            ),
            (
                "ipv4",
                &["192.168.0.1", "0.0.0.0"],
                &["256.1.1.1", "1.2.3", "01.2.3.4"],
            ),
            (
                "ipv6",
                &["::1", "2001:db8::ff00:42:8329", "fe80::"],
                &[":::", "1::2::3", "g::1"],
            ),
            (
                "duration",
                &["P3Y6M4DT12H30M5S", "PT0.5S", "P2W", "P1D"],
                &["P", "PT", "3D"],
            ),
        ];
        for (format, good, bad) in cases {
            let p = pat(format_pattern(format).expect("known format"));
            for g in good {
                assert!(matches(&p, g), "{format}: {g}");
            }
            for b in bad {
                assert!(!matches(&p, b), "{format}: {b}");
            }
        }
        assert_eq!(format_pattern("color"), None);
    }
}
