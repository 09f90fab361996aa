//! llama.cpp's GBNF grammars (`grammar` on `/completion`, `/infill` and as an extension of the
//! OpenAI routes). A regular grammar's rules are inlined from `root` into one regular
//! expression that the whole answer must match ([`super::pattern`], [`to_regex`]). A
//! recursive one (llama.cpp's `json.gbnf`, arithmetic) is compiled to the recogniser's nodes
//! (`compile`): each rule that is or leads to a recursive rule a node, sequences,
//! repetitions and alternatives around those, every regular run between them one pattern.
//! Left recursion is refused (the recogniser walks top-down).
//!
//! Syntax as llama.cpp reads it: `name ::= alternatives`, one rule per line (alternatives and
//! groups may go on over lines after `|` and inside parentheses), `#` comments; elements are
//! `"literals"`, `[character classes]` (ranges, `^`), `.`, rule names and `( groups )`, each
//! optionally followed by `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` or `{,n}`; escapes `\n`,
//! `\r`, `\t`, `\\`, `\"`, `\[`, `\]`, `\xHH`, `\uHHHH`, `\UHHHHHHHH`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::json_schema::{Node, NodeId, UNBOUNDED};
use super::pattern::Pattern;

/// Longest regular expression a grammar may inline to.
const MAX_REGEX: usize = 200_000;

#[derive(Debug, Clone)]
enum Ex {
    Alt(Vec<Ex>),
    Seq(Vec<Ex>),
    Lit(Vec<char>),
    Class {
        neg: bool,
        ranges: Vec<(char, char)>,
    },
    Any,
    Ref(String),
    Rep(Box<Ex>, u32, Option<u32>),
}

struct Parser {
    s: Vec<char>,
    at: usize,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.s.get(self.at).copied()
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        let line = self.s[..self.at.min(self.s.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count()
            + 1;
        Err(format!("GBNF line {line}: {what}"))
    }

    /// Skips blanks and comments, and newlines when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.at += 1,
                '\r' | '\n' if newlines => self.at += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.at;
        while self.peek().is_some_and(is_word) {
            self.at += 1;
        }
        if start == self.at {
            return self.fail("expected a rule name");
        }
        Ok(self.s[start..self.at].iter().collect())
    }

    fn hex(&mut self, n: usize) -> Result<char, String> {
        let digits: String = self
            .s
            .get(self.at..self.at + n)
            .unwrap_or(&[])
            .iter()
            .collect();
        self.at += n;
        u32::from_str_radix(&digits, 16)
            .ok()
            .filter(|_| digits.len() == n)
            .and_then(char::from_u32)
            .map_or_else(|| self.fail("bad hexadecimal escape"), Ok)
    }

    /// One character of a literal or class, escapes decoded.
    fn char(&mut self) -> Result<char, String> {
        let Some(c) = self.peek() else {
            return self.fail("unexpected end");
        };
        self.at += 1;
        if c != '\\' {
            return Ok(c);
        }
        let Some(e) = self.peek() else {
            return self.fail("unexpected end after `\\`");
        };
        self.at += 1;
        Ok(match e {
            'x' => return self.hex(2),
            'u' => return self.hex(4),
            'U' => return self.hex(8),
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            '\\' | '"' | '[' | ']' | '-' | '^' => e,
            _ => return self.fail(&format!("unknown escape `\\{e}`")),
        })
    }

    fn alternates(&mut self, nested: bool) -> Result<Ex, String> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.at += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            Ex::Alt(alts)
        })
    }

    fn count(&mut self) -> Option<u32> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.at += 1;
        }
        let s: String = self.s[start..self.at].iter().collect();
        s.parse().ok()
    }

    fn sequence(&mut self, nested: bool) -> Result<Ex, String> {
        let mut items = Vec::new();
        loop {
            let item = match self.peek() {
                Some('"') => {
                    self.at += 1;
                    let mut lit = Vec::new();
                    while self.peek() != Some('"') {
                        lit.push(self.char()?);
                    }
                    self.at += 1;
                    Ex::Lit(lit)
                }
                Some('[') => {
                    self.at += 1;
                    let neg = self.peek() == Some('^');
                    if neg {
                        self.at += 1;
                    }
                    let mut ranges = Vec::new();
                    while self.peek() != Some(']') {
                        let a = self.char()?;
                        let b = if self.peek() == Some('-')
                            && self.s.get(self.at + 1).is_some_and(|&c| c != ']')
                        {
                            self.at += 1;
                            self.char()?
                        } else {
                            a
                        };
                        if b < a {
                            return self.fail("a character range runs backwards");
                        }
                        ranges.push((a, b));
                    }
                    self.at += 1;
                    Ex::Class { neg, ranges }
                }
                Some('.') => {
                    self.at += 1;
                    Ex::Any
                }
                Some('(') => {
                    self.at += 1;
                    self.space(true);
                    let inner = self.alternates(true)?;
                    if self.peek() != Some(')') {
                        return self.fail("expected `)`");
                    }
                    self.at += 1;
                    inner
                }
                Some('<') => return self.fail("token references (`<…>`) are not supported"),
                Some(c) if is_word(c) => {
                    // A name followed by `::=` starts the next rule.
                    let save = self.at;
                    let name = self.name()?;
                    self.space(false);
                    if self.s[self.at..].starts_with(&[':', ':', '=']) {
                        self.at = save;
                        break;
                    }
                    self.at = save;
                    self.name()?;
                    Ex::Ref(name)
                }
                _ => break,
            };
            self.space(nested);
            let mut item = item;
            loop {
                let (min, max) = match self.peek() {
                    Some('*') => (0, None),
                    Some('+') => (1, None),
                    Some('?') => (0, Some(1)),
                    Some('{') => {
                        self.at += 1;
                        self.space(false);
                        let min = self.count();
                        self.space(false);
                        let max = if self.peek() == Some(',') {
                            self.at += 1;
                            self.space(false);
                            self.count()
                        } else {
                            Some(min.unwrap_or(0))
                        };
                        self.space(false);
                        if self.peek() != Some('}') {
                            return self.fail("expected `}` after a repetition count");
                        }
                        (min.unwrap_or(0), max)
                    }
                    _ => break,
                };
                if max.is_some_and(|m| m < min) {
                    return self.fail("a repetition's maximum is below its minimum");
                }
                self.at += 1;
                self.space(nested);
                item = Ex::Rep(Box::new(item), min, max);
            }
            items.push(item);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Ex::Seq(items)
        })
    }
}

fn parse(src: &str) -> Result<HashMap<String, Ex>, String> {
    let mut p = Parser {
        s: src.chars().collect(),
        at: 0,
    };
    let mut rules = HashMap::new();
    p.space(true);
    while p.peek().is_some() {
        let name = p.name()?;
        p.space(false);
        if !p.s[p.at..].starts_with(&[':', ':', '=']) {
            return p.fail(&format!("expected `::=` after `{name}`"));
        }
        p.at += 3;
        p.space(true);
        let body = p.alternates(false)?;
        match p.peek() {
            None | Some('\n' | '\r') => {}
            Some(c) if is_word(c) => {}
            Some(c) => return p.fail(&format!("unexpected `{c}`")),
        }
        if rules.insert(name.clone(), body).is_some() {
            return p.fail(&format!("rule `{name}` is defined twice"));
        }
        p.space(true);
    }
    Ok(rules)
}

fn class_char(c: char) -> String {
    format!("\\x{{{:X}}}", u32::from(c))
}

fn emit(
    ex: &Ex,
    rules: &HashMap<String, Ex>,
    open: &mut Vec<String>,
    out: &mut String,
) -> Result<(), String> {
    if out.len() > MAX_REGEX {
        return Err("the grammar is too large to follow".into());
    }
    match ex {
        Ex::Lit(chars) => {
            out.push_str("(?:");
            chars.iter().for_each(|&c| out.push_str(&class_char(c)));
            out.push(')');
        }
        Ex::Class { neg, ranges } => {
            out.push('[');
            if *neg {
                out.push('^');
            }
            for &(a, b) in ranges {
                out.push_str(&class_char(a));
                if b != a {
                    out.push('-');
                    out.push_str(&class_char(b));
                }
            }
            out.push(']');
        }
        Ex::Any => out.push_str("(?s:.)"),
        Ex::Ref(name) => {
            if open.contains(name) {
                return Err(format!(
                    "rule `{name}` refers back to itself: recursive grammars are not supported \
                     (use `json_schema` for JSON)"
                ));
            }
            let rule = rules
                .get(name)
                .ok_or_else(|| format!("rule `{name}` is not defined"))?;
            open.push(name.clone());
            out.push_str("(?:");
            emit(rule, rules, open, out)?;
            out.push(')');
            open.pop();
        }
        Ex::Alt(alts) => {
            out.push_str("(?:");
            for (i, a) in alts.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                emit(a, rules, open, out)?;
            }
            out.push(')');
        }
        Ex::Seq(items) => {
            out.push_str("(?:");
            for i in items {
                emit(i, rules, open, out)?;
            }
            out.push(')');
        }
        Ex::Rep(inner, min, max) => {
            out.push_str("(?:");
            emit(inner, rules, open, out)?;
            out.push(')');
            out.push_str(&match max {
                None if *min == 0 => "*".to_string(),
                None if *min == 1 => "+".to_string(),
                None => format!("{{{min},}}"),
                Some(m) => format!("{{{min},{m}}}"),
            });
        }
    }
    Ok(())
}

/// The regular expression (Rust's syntax) a GBNF grammar's `root` amounts to. The error
/// says why it cannot be followed.
pub fn to_regex(src: &str) -> Result<String, String> {
    let rules = parse(src)?;
    let root = rules.get("root").ok_or("the grammar has no `root` rule")?;
    let mut out = String::new();
    emit(root, &rules, &mut vec!["root".to_string()], &mut out)?;
    Ok(out)
}

/// What a GBNF grammar compiles to.
pub(crate) enum Compiled {
    /// Regular: one regular expression for the whole answer ([`to_regex`]).
    Regex(String),
    /// Recursive: `base` extended with the grammar's pieces — each rule that is (or leads
    /// to) a recursive one a node, sequences, repetitions and alternatives around them, and
    /// every regular run between them one pattern.
    Pieces { nodes: Vec<Node>, root: NodeId },
}

/// Most nodes a grammar may compile to (node ids are 16 bits).
const MAX_PIECES: usize = 4096;

fn refs<'a>(ex: &'a Ex, out: &mut Vec<&'a str>) {
    match ex {
        Ex::Ref(n) => out.push(n),
        Ex::Alt(v) | Ex::Seq(v) => v.iter().for_each(|e| refs(e, out)),
        Ex::Rep(e, ..) => refs(e, out),
        Ex::Lit(_) | Ex::Class { .. } | Ex::Any => {}
    }
}

/// Compiles `src` (see [`Compiled`]); `base`: the grammar's first nodes.
pub(crate) fn compile(src: &str, base: Vec<Node>) -> Result<Compiled, String> {
    let rules = parse(src)?;
    if !rules.contains_key("root") {
        return Err("the grammar has no `root` rule".into());
    }
    // Each rule's direct references, all defined.
    let mut graph: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, ex) in &rules {
        let mut r = Vec::new();
        refs(ex, &mut r);
        if let Some(missing) = r.iter().find(|n| !rules.contains_key(**n)) {
            return Err(format!("rule `{missing}` is not defined"));
        }
        graph.insert(name, r);
    }
    let reach = |from: &str| -> HashSet<&str> {
        let mut seen = HashSet::new();
        let mut todo: Vec<&str> = graph[from].clone();
        while let Some(n) = todo.pop() {
            if seen.insert(n) {
                todo.extend(graph[n].iter().copied());
            }
        }
        seen
    };
    let reaches: HashMap<&str, HashSet<&str>> = graph.keys().map(|&n| (n, reach(n))).collect();
    let recursive: HashSet<&str> = reaches
        .iter()
        .filter(|(n, r)| r.contains(*n))
        .map(|(n, _)| *n)
        .collect();
    let irregular: HashSet<String> = reaches
        .iter()
        .filter(|(n, r)| recursive.contains(*n) || r.iter().any(|m| recursive.contains(m)))
        .map(|(n, _)| n.to_string())
        .collect();
    if !irregular.contains("root") {
        return to_regex(src).map(Compiled::Regex);
    }
    let mut b = Build {
        rules: &rules,
        irregular,
        ids: HashMap::new(),
        nodes: base,
    };
    let mut names: Vec<&String> = rules.keys().filter(|n| b.irregular.contains(*n)).collect();
    names.sort();
    for name in &names {
        let id = b.push(Node::Alias(0))?;
        b.ids.insert(name.to_string(), id);
    }
    for name in names {
        let body = b.node(&rules[name])?;
        b.nodes[usize::from(b.ids[name])] = Node::Alias(body);
    }
    Ok(Compiled::Pieces {
        root: b.ids["root"],
        nodes: b.nodes,
    })
}

struct Build<'a> {
    rules: &'a HashMap<String, Ex>,
    /// Rules that are recursive or lead to one.
    irregular: HashSet<String>,
    /// Their nodes.
    ids: HashMap<String, NodeId>,
    nodes: Vec<Node>,
}

impl Build<'_> {
    fn push(&mut self, n: Node) -> Result<NodeId, String> {
        if self.nodes.len() >= MAX_PIECES {
            return Err("the grammar is too large to follow".into());
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn regular(&self, ex: &Ex) -> bool {
        let mut r = Vec::new();
        refs(ex, &mut r);
        !r.iter().any(|n| self.irregular.contains(*n))
    }

    /// A regular part as one pattern (its rules inlined).
    fn pattern(&mut self, ex: &Ex) -> Result<NodeId, String> {
        let mut out = String::new();
        emit(ex, self.rules, &mut Vec::new(), &mut out)?;
        let p = Pattern::labeled(&format!("^(?:{out})$"), "the grammar", 0, UNBOUNDED)?;
        self.push(Node::Regex(Arc::new(p)))
    }

    fn node(&mut self, ex: &Ex) -> Result<NodeId, String> {
        if self.regular(ex) {
            return self.pattern(ex);
        }
        match ex {
            Ex::Ref(name) => Ok(self.ids[name]),
            Ex::Alt(alts) => {
                let ids = alts
                    .iter()
                    .map(|a| self.node(a))
                    .collect::<Result<Vec<_>, _>>()?;
                self.push(Node::OneOf(ids))
            }
            Ex::Seq(items) => {
                // Runs of regular items become one pattern each.
                let mut ids = Vec::new();
                let mut run: Vec<Ex> = Vec::new();
                for it in items {
                    if self.regular(it) {
                        run.push(it.clone());
                        continue;
                    }
                    if !run.is_empty() {
                        ids.push(self.pattern(&Ex::Seq(std::mem::take(&mut run)))?);
                    }
                    ids.push(self.node(it)?);
                }
                if !run.is_empty() {
                    ids.push(self.pattern(&Ex::Seq(run))?);
                }
                if ids.len() == 1 {
                    return Ok(ids[0]);
                }
                self.push(Node::Seq(ids.into()))
            }
            Ex::Rep(inner, min, max) => {
                let item = self.node(inner)?;
                self.push(Node::Rep {
                    item,
                    min: *min,
                    max: max.unwrap_or(UNBOUNDED),
                })
            }
            Ex::Lit(_) | Ex::Class { .. } | Ex::Any => self.pattern(ex),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(grammar: &str, text: &str) -> bool {
        let re = to_regex(grammar).unwrap_or_else(|e| panic!("{e}"));
        regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(text))
    }

    #[test]
    fn regular_grammars_become_their_regular_expression() {
        let g = r#"
            # A yes/no answer with a reason.
            root   ::= answer ", because " reason "."
            answer ::= "yes" | "no"
            reason ::= [a-z ]+
        "#;
        assert!(matches(g, "yes, because it rains."));
        assert!(!matches(g, "maybe, because it rains."));
        assert!(!matches(g, "no, because 2."));
        let list = "root ::= item{2,3}\nitem ::= \"- \" [^\\n]+ \"\\n\"\n";
        assert!(matches(list, "- a\n- b\n"));
        assert!(!matches(list, "- a\n"));
        assert!(!matches(list, "- a\n- b\n- c\n- d\n"));
        // Alternatives over lines, groups, `?`, `*`, `.`, escapes, `{m,}` and `{,n}`.
        let g = "root ::= ( \"a\" |\n  \"b\" )? x* . \"\\x41\\u00e9\" [\\]-] y{2,} z{,1}\n\
                 x ::= \"\\\"\"\ny ::= \"y\"\nz ::= \"\\t\"";
        assert!(matches(g, "b\"\"?Aé]yy"));
        assert!(matches(g, "?Aé-yyy\t"));
        assert!(!matches(g, "ab?Aé]yy"));
        assert!(!matches(g, "?Aé]y"));
    }

    #[test]
    fn what_cannot_be_followed_is_refused() {
        for (g, says) in [
            (
                "root ::= \"[\" value \"]\"\nvalue ::= \"1\" | root",
                "refers back",
            ),
            ("root ::= item", "not defined"),
            ("item ::= \"a\"", "no `root`"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root := \"a\"", "`::=`"),
            ("root ::= [z-a]", "backwards"),
            ("root ::= \"a\"{3,1}", "below"),
            ("root ::= <think>", "token references"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= (\"a\"", "`)`"),
        ] {
            let e = to_regex(g).expect_err(g);
            assert!(e.contains(says), "{g}: {e}");
        }
    }
}
