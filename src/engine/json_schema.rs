//! The grammars JSON mode follows: any object ([`Grammar::any_object`]), a compiled JSON
//! Schema ([`Grammar::from_schema`], `response_format: {"type": "json_schema"}`), a tool call
//! ([`Grammar::tool_call`]) or one of a list of texts ([`Grammar::choice`]).
//!
//! A schema is compiled into a small graph of `Node`s that the recogniser in
//! [`super::json_mode`] walks byte by byte. What is generated is always a valid instance of the
//! schema, but not every valid instance can be generated: objects give their declared
//! properties in the schema's order (required ones always, optional ones when the model
//! chooses), never others — which is what OpenAI's strict structured outputs, llama.cpp and
//! vLLM do too. Numbers keep to `minimum`/`maximum` (and the exclusive forms): bounded ones
//! are written without an exponent, with at most 9 decimals and an integer part up to
//! 4294967295. Strings keep to a `pattern` (a regular expression, see [`super::pattern`])
//! and to the `format`s OpenAI's structured outputs name (`date-time`, `date`, `time`,
//! `duration`, `email`, `hostname`, `ipv4`, `ipv6`, `uuid`: written as patterns); other
//! formats are annotations, as JSON Schema 2020-12 defines them by default. Keywords that
//! constrain values in ways the recogniser cannot follow (`uniqueItems`, `not`, …) are refused
//! rather than silently ignored. `multipleOf` is followed like the bounds (the same limits).
//! Alternatives (`anyOf`, `oneOf` — followed as `anyOf`, as llama.cpp, vLLM and OpenAI do —,
//! a list of types) may start alike (two objects, a string or an enum, `integer` or `number`):
//! the recogniser follows each reading until the text tells them apart.
//! [`Grammar::regex`] is a whole answer that matches a pattern (vLLM's `guided_regex`);
//! [`Grammar::gbnf`] one that a llama.cpp GBNF grammar allows (a pattern when it is regular,
//! else sequences, repetitions and alternatives of pieces: [`super::gbnf`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use super::pattern::{format_pattern, Pattern};

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Most functions a Hermes call grammar follows one by one (each its own reading until the
/// name tells them apart); more share one.
pub const MAX_NAMED_CALLS: usize = 16;

/// Index of a node in a [`Grammar`].
pub type NodeId = u16;

/// No upper bound (`maxLength`, `maxItems`).
pub(crate) const UNBOUNDED: u32 = u32::MAX;

/// Any JSON value.
pub(crate) const ANY: NodeId = 0;
/// Any JSON object.
pub(crate) const ANY_OBJECT: NodeId = 1;
/// Any string (also every key of a free object).
pub(crate) const ANY_STRING: NodeId = 3;
const ANY_ARRAY: NodeId = 2;
const ANY_NUMBER: NodeId = 4;
const ANY_LITERAL: NodeId = 5;

/// Most nodes one schema compiles to.
const MAX_NODES: usize = 4096;
/// Longest `enum`/`const` text or property name.
pub const MAX_LITERAL: usize = 16384;

/// One declared property of an object.
#[derive(Debug, Hash)]
pub(crate) struct Prop {
    /// The key as JSON text, quotes included (what the model must write).
    pub key: Box<[u8]>,
    pub value: NodeId,
    pub required: bool,
}

/// What a value must be.
#[derive(Debug, Hash)]
pub(crate) enum Node {
    /// `{…}`: the declared properties in order; with none, `extra` (when set) is the schema
    /// of any number of free keys' values (`additionalProperties`). `one`: exactly one of the
    /// properties, whichever (a tool call: `{"name": {arguments}}`).
    Object {
        props: Vec<Prop>,
        extra: Option<NodeId>,
        one: bool,
    },
    /// `[…]` of `prefix` (a tuple's items, one node per place: `prefixItems`) then `items`,
    /// between `min` and `max` of them.
    Array {
        items: NodeId,
        min: u32,
        max: u32,
        prefix: Box<[NodeId]>,
    },
    /// A string of `min` to `max` characters, matching `pattern` if there is one (which
    /// then keeps the lengths itself).
    String {
        min: u32,
        max: u32,
        pattern: Option<Arc<Pattern>>,
    },
    /// A number (`integer`: no fraction or exponent), within `bounds` when set: inclusive
    /// `[low, high]` in units of 10⁻⁹ ([`NUM_SCALE`]; multiples of it for an integer); a
    /// multiple of `step` (units; `multipleOf`, for an integer the least common multiple
    /// with a whole unit) when set, which then always comes with bounds.
    Number {
        integer: bool,
        bounds: Option<[i128; 2]>,
        step: Option<i128>,
    },
    /// One of these JSON texts exactly (`enum`, `const`, `true`/`false`, `null`).
    Literals(Vec<Box<[u8]>>),
    /// One of these (`anyOf`, `oneOf`, a list of types): the recogniser follows every one
    /// that the text so far can be, until the text tells them apart.
    OneOf(Vec<NodeId>),
    /// The same as another node (a `$ref`).
    Alias(NodeId),
    /// Free text, or — when its first byte (after any whitespace the root allows) can begin
    /// the node, `{` or `<` — the node (a tool call the model may or may not make).
    TextOr(NodeId),
    /// Raw text (not JSON) that matches the pattern: a whole answer ([`Grammar::regex`]),
    /// or a regular piece of a GBNF grammar (possibly empty).
    Regex(Arc<Pattern>),
    /// These one after another (a GBNF sequence with a recursive part).
    Seq(Box<[NodeId]>),
    /// `min` to `max` of `item` one after another (a GBNF repetition of a recursive part).
    Rep { item: NodeId, min: u32, max: u32 },
}

/// How a model writes a tool call that names its function: `open`, then
/// `{"name": "<function>", "<arguments_key>": {…}}`, then `close`; several calls
/// `separator` apart, all of them between `begin` and `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallShape {
    /// The tag that says calls follow (what a lazy grammar waits for; empty: none).
    pub trigger: &'static str,
    /// Text before the calls.
    pub begin: &'static str,
    /// Text after the calls.
    pub end: &'static str,
    /// Text before each call.
    pub open: &'static str,
    /// Text after each call.
    pub close: &'static str,
    /// Text between calls.
    pub separator: &'static str,
    /// The key of the arguments object.
    pub arguments_key: &'static str,
}

impl CallShape {
    /// Hermes' `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, a newline between
    /// calls (Qwen2.5, Qwen3, Hermes 2/3).
    pub const HERMES: CallShape = CallShape {
        trigger: "<tool_call>",
        begin: "",
        end: "",
        open: "<tool_call>\n",
        close: "\n</tool_call>",
        separator: "\n",
        arguments_key: "arguments",
    };
    /// Llama 3.1–3.3's custom-tool calls: `{"name": …, "parameters": {…}}`, bare (their
    /// templates take one call per turn).
    pub const LLAMA: CallShape = CallShape {
        trigger: "",
        begin: "",
        end: "",
        open: "",
        close: "",
        separator: "; ",
        arguments_key: "parameters",
    };
    /// Mistral's 'v3' templates (Mistral 7B v0.3, Large 2407): one JSON array after the
    /// `[TOOL_CALLS]` tag, `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]`.
    pub const MISTRAL: CallShape = CallShape {
        trigger: "[TOOL_CALLS]",
        begin: "[TOOL_CALLS] [",
        end: "]",
        open: "",
        close: "",
        separator: ", ",
        arguments_key: "arguments",
    };
    /// Mistral's 'v3-tekken' and later templates (Nemo, Small 3.x): the same without the
    /// space, `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
    pub const MISTRAL_TEKKEN: CallShape = CallShape {
        begin: "[TOOL_CALLS][",
        ..CallShape::MISTRAL
    };
}

/// A compiled schema: what JSON mode lets the model write.
#[derive(Debug)]
pub struct Grammar {
    /// Names this grammar in the engine's memo of allowed sets: a hash of what it allows
    /// (keyed per process), so requests with the same schema share their sets.
    pub(crate) id: u64,
    pub(crate) nodes: Vec<Node>,
    pub(crate) root: NodeId,
    /// Whether whitespace may come before the root value (JSON: yes; a choice: no).
    pub(crate) root_space: bool,
    /// Each node's possible first bytes (a 256-bit set).
    first: Vec<[u64; 4]>,
    /// Whether each node can be empty (only GBNF pieces can).
    nullable: Vec<bool>,
    /// A lazy grammar's trigger: the text is free until it writes these bytes, and from
    /// them on it is held to the grammar (whose values begin with them). `None`: held from
    /// the first byte.
    pub(crate) trigger: Option<Box<[u8]>>,
}

/// Why a schema cannot be followed, and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// JSON pointer of the offending part (`#/properties/age`).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at `{}`)", self.message, self.path)
    }
}

impl std::error::Error for SchemaError {}

/// Keywords that restrict values in ways not followed: refused so no client is told its
/// constraint holds when it does not.
const UNSUPPORTED: &[&str] = &[
    "patternProperties",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
];

fn first_of(bytes: &[u8]) -> [u64; 4] {
    let mut set = [0u64; 4];
    for &b in bytes {
        set[usize::from(b / 64)] |= 1 << (b % 64);
    }
    set
}

impl Grammar {
    /// JSON mode without a schema: any JSON object.
    pub fn any_object() -> Grammar {
        let mut g = Grammar::new(base_nodes(), ANY_OBJECT, true);
        g.first = compute_first(&g.nodes).unwrap_or_default();
        g
    }

    /// Compiles a JSON Schema (draft 2020-12 / OpenAI structured outputs subset: `type`
    /// (one or a list), `properties`, `required`, `additionalProperties`, `items`,
    /// `minItems`, `maxItems`, `minLength`, `maxLength`, `enum`, `const`, `anyOf`, `oneOf`,
    /// a one-element `allOf`, local `$ref`s (`#/$defs/…`, `#/definitions/…`, `#`, recursion
    /// included); annotations such as `title`, `description`, `default` and `format` are
    /// ignored).
    pub fn from_schema(schema: &Value) -> Result<Grammar, SchemaError> {
        let mut c = Compiler {
            root: schema,
            nodes: base_nodes(),
            refs: HashMap::new(),
        };
        let root = c.node(schema, "#", 0)?;
        c.finish(root)
    }

    /// A tool call: one object whose one key is a tool's name and whose value is that tool's
    /// arguments (its `parameters` schema; any object without one). `text_allowed`: the
    /// model may answer in plain text instead (any first byte but `{` leaves the grammar).
    pub fn tool_call(
        tools: &[(&str, Option<&Value>)],
        text_allowed: bool,
    ) -> Result<Grammar, SchemaError> {
        let mut c = Compiler::for_tools();
        let mut props = Vec::new();
        for (i, (name, params)) in tools.iter().enumerate() {
            let value = c.tool_parameters(i, *params)?;
            props.push(Prop {
                key: json_string(name).into_bytes().into(),
                value,
                required: false,
            });
        }
        let call = c.push(
            Node::Object {
                props,
                extra: None,
                one: true,
            },
            "tools",
        )?;
        let root = if text_allowed {
            c.push(Node::TextOr(call), "tools")?
        } else {
            call
        };
        c.finish(root)
    }

    /// Calls as a template's model is trained to write them ([`CallShape`]):
    /// `{"name": "<function>", "<arguments key>": {…}}` between the shape's tags, the name
    /// one of `tools` and the arguments an instance of its parameters (`name` first, as their
    /// templates show it); 1 to `max_calls` of them, the shape's separator apart. More
    /// functions than [`MAX_NAMED_CALLS`] share one reading: any declared name, arguments any
    /// object. `text_allowed`: or free text — with an opening tag, text up to the tag
    /// (a lazy grammar: held from the tag on, wherever it comes, as llama.cpp's lazy grammars
    /// arm on a trigger word); without one, when the answer does not open like a call.
    pub fn named_calls(
        tools: &[(&str, Option<&Value>)],
        shape: &CallShape,
        text_allowed: bool,
        max_calls: u32,
    ) -> Result<Grammar, SchemaError> {
        let mut c = Compiler::for_tools();
        let key = |k: &str| -> Box<[u8]> { json_string(k).into_bytes().into() };
        let call = |c: &mut Compiler, names: Vec<Box<[u8]>>, arguments: NodeId| {
            let name = c.push(Node::Literals(names), "tools")?;
            c.push(
                Node::Object {
                    props: vec![
                        Prop {
                            key: key("name"),
                            value: name,
                            required: true,
                        },
                        Prop {
                            key: key(shape.arguments_key),
                            value: arguments,
                            required: true,
                        },
                    ],
                    extra: None,
                    one: false,
                },
                "tools",
            )
        };
        let body = if tools.len() > MAX_NAMED_CALLS {
            let names = tools
                .iter()
                .map(|(n, _)| json_string(n).into_bytes().into())
                .collect();
            call(&mut c, names, ANY_OBJECT)?
        } else {
            let mut calls = Vec::new();
            for (i, (name, params)) in tools.iter().enumerate() {
                let arguments = c.tool_parameters(i, *params)?;
                calls.push(call(
                    &mut c,
                    vec![json_string(name).into_bytes().into()],
                    arguments,
                )?);
            }
            match calls.as_slice() {
                [one] => *one,
                _ => c.push(Node::OneOf(calls), "tools")?,
            }
        };
        let one = c.between(shape.open, body, shape.close)?;
        let calls = if max_calls > 1 {
            let separator = shape.separator.as_bytes().into();
            let separator = c.push(Node::Literals(vec![separator]), "tools")?;
            let next = c.push(Node::Seq(vec![separator, one].into()), "tools")?;
            let more = c.push(
                Node::Rep {
                    item: next,
                    min: 0,
                    max: max_calls - 1,
                },
                "tools",
            )?;
            c.push(Node::Seq(vec![one, more].into()), "tools")?
        } else {
            one
        };
        let whole = c.between(shape.begin, calls, shape.end)?;
        let tag = shape.trigger;
        let root = if text_allowed && tag.is_empty() {
            c.push(Node::TextOr(whole), "tools")?
        } else {
            whole
        };
        let mut g = c.finish(root)?;
        g.root_space = false;
        if text_allowed && !tag.is_empty() {
            g.trigger = Some(tag.as_bytes().into());
        }
        g.rehash();
        // Its raw pieces (the tags, the calls' repetition) end the answer where they may.
        g.nullable = compute_nullable(&g.nodes);
        g.first = compute_first_nullable(&g.nodes, &g.nullable).map_err(|()| SchemaError {
            path: "tools".into(),
            message: "an `anyOf` refers back to itself before any value".into(),
        })?;
        Ok(g)
    }

    /// Exactly one of these texts, as they are (vLLM's `guided_choice`); each of 1 to
    /// [`MAX_LITERAL`] bytes (positions are counted in 16 bits).
    pub fn choice(texts: &[&str]) -> Grammar {
        let mut lits: Vec<Box<[u8]>> = Vec::new();
        for t in texts {
            let t: Box<[u8]> = t.as_bytes().into();
            if !lits.contains(&t) {
                lits.push(t);
            }
        }
        let mut nodes = base_nodes();
        nodes.push(Node::Literals(lits));
        let root = (nodes.len() - 1) as NodeId;
        let mut g = Grammar::new(nodes, root, false);
        g.first = compute_first(&g.nodes).unwrap_or_default();
        g
    }

    /// A whole answer (raw text, not JSON) that the regular expression `source` matches from
    /// its first character to its last (vLLM's `guided_regex`, unlike a schema's `pattern`
    /// which may match anywhere); see [`super::pattern`] for the dialect. The error says why
    /// it cannot be followed.
    pub fn regex(source: &str) -> Result<Grammar, String> {
        Ok(Self::raw(Pattern::new(
            &format!("^(?:{source})$"),
            0,
            UNBOUNDED,
        )?))
    }

    /// A whole answer that a llama.cpp GBNF grammar allows, when the grammar is regular (see
    /// [`super::gbnf`]). The error says why it cannot be followed.
    pub fn gbnf(source: &str) -> Result<Grammar, String> {
        match super::gbnf::compile(source, base_nodes())? {
            super::gbnf::Compiled::Regex(regex) => {
                let pattern =
                    Pattern::labeled(&format!("^(?:{regex})$"), "the grammar", 0, UNBOUNDED)?;
                Ok(Self::raw(pattern))
            }
            super::gbnf::Compiled::Pieces { nodes, root } => Self::from_nodes(nodes, root),
        }
    }

    /// Raw text matching `pattern`, as a whole answer.
    fn raw(pattern: Pattern) -> Grammar {
        let mut nodes = base_nodes();
        nodes.push(Node::Regex(Arc::new(pattern)));
        let root = (nodes.len() - 1) as NodeId;
        let mut g = Grammar::new(nodes, root, false);
        g.first = compute_first(&g.nodes).unwrap_or_default();
        g
    }

    fn new(nodes: Vec<Node>, root: NodeId, root_space: bool) -> Grammar {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        let id =
            KEYS.get_or_init(RandomState::new)
                .hash_one((&nodes, root, root_space, None::<&[u8]>));
        Grammar {
            id,
            nodes,
            root,
            root_space,
            first: Vec::new(),
            nullable: Vec::new(),
            trigger: None,
        }
    }

    /// The id again, after `root_space` or `trigger` changed.
    fn rehash(&mut self) {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        self.id = KEYS.get_or_init(RandomState::new).hash_one((
            &self.nodes,
            self.root,
            self.root_space,
            self.trigger.as_deref(),
        ));
    }

    /// A grammar over GBNF's nodes ([`super::gbnf`]) from `root`; `Err` names a rule that
    /// refers back to itself before any character (left recursion).
    pub(crate) fn from_nodes(nodes: Vec<Node>, root: NodeId) -> Result<Grammar, String> {
        let mut g = Grammar::new(nodes, root, false);
        g.nullable = compute_nullable(&g.nodes);
        g.first = compute_first_nullable(&g.nodes, &g.nullable).map_err(|_| {
            "the grammar refers back to a rule before any character (left recursion)".to_string()
        })?;
        Ok(g)
    }

    /// Whether this is a GBNF grammar over pieces ([`Grammar::from_nodes`]).
    pub(crate) fn has_pieces(&self) -> bool {
        !self.nullable.is_empty()
    }

    /// Whether a value of `id` can be empty.
    pub(crate) fn nullable(&self, id: NodeId) -> bool {
        self.nullable.get(usize::from(id)).copied().unwrap_or(false)
    }

    /// The node behind any chain of aliases.
    pub(crate) fn resolve(&self, mut id: NodeId) -> (NodeId, &Node) {
        loop {
            match &self.nodes[usize::from(id)] {
                Node::Alias(t) => id = *t,
                n => return (id, n),
            }
        }
    }

    /// Whether a value of `id` can start with `b`.
    pub(crate) fn can_start(&self, id: NodeId, b: u8) -> bool {
        self.first
            .get(usize::from(id))
            .is_some_and(|f| f[usize::from(b / 64)] >> (b % 64) & 1 == 1)
    }
}

fn base_nodes() -> Vec<Node> {
    vec![
        Node::OneOf(vec![
            ANY_OBJECT,
            ANY_ARRAY,
            ANY_STRING,
            ANY_NUMBER,
            ANY_LITERAL,
        ]),
        Node::Object {
            props: Vec::new(),
            extra: Some(ANY),
            one: false,
        },
        Node::Array {
            items: ANY,
            min: 0,
            max: UNBOUNDED,
            prefix: Box::new([]),
        },
        Node::String {
            min: 0,
            max: UNBOUNDED,
            pattern: None,
        },
        Node::Number {
            integer: false,
            bounds: None,
            step: None,
        },
        Node::Literals(vec![
            b"true"[..].into(),
            b"false"[..].into(),
            b"null"[..].into(),
        ]),
    ]
}

/// Every node's first-byte set; `Err` when an alternative leads back to itself.
fn compute_first(nodes: &[Node]) -> Result<Vec<[u64; 4]>, ()> {
    compute_first_nullable(nodes, &vec![false; nodes.len()])
}

/// Which nodes can be empty: a fixpoint (recursion through aliases allowed).
fn compute_nullable(nodes: &[Node]) -> Vec<bool> {
    let mut null = vec![false; nodes.len()];
    loop {
        let mut changed = false;
        for (i, n) in nodes.iter().enumerate() {
            let at = |id: &NodeId| null[usize::from(*id)];
            let v = match n {
                Node::Regex(p) => p.accepts(p.start(), 0),
                Node::Seq(items) => items.iter().all(at),
                Node::Rep { item, min, .. } => *min == 0 || at(item),
                Node::OneOf(alts) => alts.iter().any(at),
                Node::Alias(t) => at(t),
                _ => false,
            };
            if v && !null[i] {
                null[i] = true;
                changed = true;
            }
        }
        if !changed {
            return null;
        }
    }
}

/// Every node's first-byte set given which nodes can be empty (a sequence starts with its
/// items up to the first that cannot be); `Err` when a node leads back to itself before
/// any byte.
fn compute_first_nullable(nodes: &[Node], nullable: &[bool]) -> Result<Vec<[u64; 4]>, ()> {
    fn visit(
        nodes: &[Node],
        nullable: &[bool],
        id: NodeId,
        memo: &mut Vec<Option<[u64; 4]>>,
        busy: &mut Vec<bool>,
    ) -> Result<[u64; 4], ()> {
        let i = usize::from(id);
        if let Some(f) = memo[i] {
            return Ok(f);
        }
        if busy[i] {
            return Err(());
        }
        busy[i] = true;
        let f = match &nodes[i] {
            Node::Object { .. } => first_of(b"{"),
            Node::Array { .. } => first_of(b"["),
            Node::String { .. } => first_of(b"\""),
            Node::Regex(p) => first_of(&p.first_bytes()),
            Node::Number { .. } => first_of(b"-0123456789"),
            Node::Literals(l) => first_of(
                &l.iter()
                    .filter_map(|t| t.first().copied())
                    .collect::<Vec<_>>(),
            ),
            Node::OneOf(alts) => {
                let mut set = [0u64; 4];
                for &a in alts {
                    let f = visit(nodes, nullable, a, memo, busy)?;
                    for k in 0..4 {
                        set[k] |= f[k];
                    }
                }
                set
            }
            Node::Alias(t) => visit(nodes, nullable, *t, memo, busy)?,
            Node::TextOr(_) => [u64::MAX; 4],
            Node::Seq(items) => {
                let mut set = [0u64; 4];
                for &a in items.iter() {
                    let f = visit(nodes, nullable, a, memo, busy)?;
                    for k in 0..4 {
                        set[k] |= f[k];
                    }
                    if !nullable[usize::from(a)] {
                        break;
                    }
                }
                set
            }
            Node::Rep { item, .. } => visit(nodes, nullable, *item, memo, busy)?,
        };
        busy[i] = false;
        memo[i] = Some(f);
        Ok(f)
    }
    let mut memo = vec![None; nodes.len()];
    let mut busy = vec![false; nodes.len()];
    (0..nodes.len())
        .map(|i| visit(nodes, nullable, i as NodeId, &mut memo, &mut busy))
        .collect()
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    /// `$ref` → its node (allocated before compiling the target, so recursion ends).
    refs: HashMap<String, NodeId>,
}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError {
        path: path.to_owned(),
        message: message.into(),
    })
}

/// A non-negative integer keyword.
/// Units of a bounded number: 10⁻⁹ (the most decimals a bounded number is written with).
pub(crate) const NUM_SCALE: i128 = 1_000_000_000;
/// The largest integer part of a bounded number (the recogniser counts it in 32 bits).
pub(crate) const NUM_MAX_INT: i128 = u32::MAX as i128;
/// Beyond this a bound is as good as none (no bounded number gets there).
const NUM_FAR: i128 = (NUM_MAX_INT + 1) * NUM_SCALE;

/// `n` in units of [`NUM_SCALE`], rounded up (`ceil`) or down, saturating at ±[`NUM_FAR`].
/// Exact for every number of at most 9 decimals, so the generated numbers (at most 9
/// decimals) meet a rounded bound exactly when they meet the bound itself.
fn scaled(n: &serde_json::Number, ceil: bool) -> i128 {
    // Numbers print as their shortest exact decimal (`1e-12`, `0.3`, `42`).
    let text = n.to_string();
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (text.as_str(), 0),
    };
    let neg = mantissa.starts_with('-');
    let mantissa = mantissa.trim_start_matches('-');
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    // The value is digits × 10^point10 with point10 = exp − |frac|; in units: exp − |frac| + 9.
    let shift = exp - frac.len() as i32 + 9;
    let mut v: i128 = 0;
    let mut inexact = false;
    let keep = digits.len() as i32 + shift.min(0);
    for (i, &d) in digits.iter().enumerate() {
        if (i as i32) < keep {
            v = v.saturating_mul(10).saturating_add(i128::from(d));
        } else if d != 0 {
            inexact = true;
        }
    }
    for _ in 0..shift.max(0) {
        v = v.saturating_mul(10);
        if v > NUM_FAR {
            break;
        }
    }
    let v = v.min(NUM_FAR);
    // Truncation went toward zero: one unit more away from zero where that is the rounding.
    match (neg, inexact) {
        (false, true) if ceil => v + 1,
        (true, true) if !ceil => -(v + 1),
        (true, _) => -v,
        (false, _) => v,
    }
}

/// `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` of a number schema as inclusive
/// bounds in units of [`NUM_SCALE`] (whole units for an integer), `None` when it has none.
fn number_bounds(s: &Value, integer: bool, path: &str) -> Result<Option<[i128; 2]>, SchemaError> {
    let num = |key: &str| -> Result<Option<&serde_json::Number>, SchemaError> {
        match s.get(key) {
            None | Some(Value::Bool(_)) => Ok(None),
            Some(Value::Number(n)) => Ok(Some(n)),
            Some(_) => err(path, format!("`{key}` must be a number")),
        }
    };
    // Draft 4 wrote `exclusiveMinimum: true` next to `minimum`.
    let flag = |key: &str| s.get(key) == Some(&Value::Bool(true));
    let mut lo = -NUM_FAR;
    let mut hi = NUM_FAR;
    if let Some(n) = num("minimum")? {
        let b = scaled(n, true);
        lo = lo.max(if flag("exclusiveMinimum") && b == scaled(n, false) {
            b + 1
        } else {
            b
        });
    }
    if let Some(n) = num("exclusiveMinimum")? {
        // Above a number: the next unit up (one more when it sits on a unit).
        lo = lo.max(scaled(n, false) + 1);
    }
    if let Some(n) = num("maximum")? {
        let b = scaled(n, false);
        hi = hi.min(if flag("exclusiveMaximum") && b == scaled(n, true) {
            b - 1
        } else {
            b
        });
    }
    if let Some(n) = num("exclusiveMaximum")? {
        hi = hi.min(scaled(n, true) - 1);
    }
    if lo == -NUM_FAR && hi == NUM_FAR {
        return Ok(None);
    }
    if integer {
        // Whole units: up to the next integer from below, down from above.
        lo = lo.div_euclid(NUM_SCALE) * NUM_SCALE
            + if lo.rem_euclid(NUM_SCALE) != 0 {
                NUM_SCALE
            } else {
                0
            };
        hi = hi.div_euclid(NUM_SCALE) * NUM_SCALE;
    }
    let reach = NUM_MAX_INT * NUM_SCALE + (NUM_SCALE - 1);
    if lo > hi || lo > reach || hi < -reach {
        let what = if integer { "integer" } else { "number" };
        return err(
            path,
            format!(
                "no {what} between the bounds can be generated (bounded numbers are at most \
                 4294967295 in magnitude, with at most 9 decimals)"
            ),
        );
    }
    Ok(Some([lo.max(-reach), hi.min(reach)]))
}

/// `multipleOf` in units of [`NUM_SCALE`] (for an integer, the least common multiple with a
/// whole unit): a positive number with at most 9 decimals.
fn multiple_of(s: &Value, integer: bool, path: &str) -> Result<Option<i128>, SchemaError> {
    let n = match s.get("multipleOf") {
        None => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(_) => return err(path, "`multipleOf` must be a number"),
    };
    let m = scaled(n, false);
    if m <= 0 || m != scaled(n, true) || m > NUM_MAX_INT * NUM_SCALE {
        return err(
            path,
            "`multipleOf` must be above 0, with at most 9 decimals and at most 4294967295",
        );
    }
    if !integer {
        return Ok(Some(m));
    }
    let gcd = |mut a: i128, mut b: i128| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    Ok(Some(m / gcd(m, NUM_SCALE) * NUM_SCALE))
}

fn count(s: &Value, key: &str, path: &str) -> Result<Option<u32>, SchemaError> {
    match s.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v.min(u64::from(UNBOUNDED - 1)) as u32)),
            None => err(path, format!("`{key}` must be a non-negative integer")),
        },
        Some(_) => err(path, format!("`{key}` must be a non-negative integer")),
    }
}

impl<'a> Compiler<'a> {
    /// The grammar of `root`, checked: aliases end at a value, no alternative leads back to
    /// itself before a value starts.
    fn finish(self, root: NodeId) -> Result<Grammar, SchemaError> {
        let mut g = Grammar::new(self.nodes, root, true);
        // Aliases must end at a value.
        for start in 0..g.nodes.len() {
            let mut id = start as NodeId;
            for _ in 0..=g.nodes.len() {
                match g.nodes[usize::from(id)] {
                    Node::Alias(t) => id = t,
                    _ => break,
                }
            }
            if matches!(g.nodes[usize::from(id)], Node::Alias(_)) {
                return Err(SchemaError {
                    path: "#".into(),
                    message: "a `$ref` cycle never reaches a schema".into(),
                });
            }
        }
        g.first = compute_first(&g.nodes).map_err(|()| SchemaError {
            path: "#".into(),
            message: "an `anyOf` refers back to itself before any value".into(),
        })?;
        Ok(g)
    }

    /// A compiler for tools' parameters (each sets its own root).
    fn for_tools() -> Self {
        const NO_SCHEMA: &Value = &Value::Null;
        Compiler {
            root: NO_SCHEMA,
            nodes: base_nodes(),
            refs: HashMap::new(),
        }
    }

    /// Tool `i`'s arguments: an instance of its `parameters` (any object without them); each
    /// tool's `$ref`s are relative to its own parameters.
    fn tool_parameters(
        &mut self,
        i: usize,
        params: Option<&'a Value>,
    ) -> Result<NodeId, SchemaError> {
        let Some(p) = params else {
            return Ok(ANY_OBJECT);
        };
        self.root = p;
        self.refs.clear();
        self.node(p, &format!("tools[{i}].function.parameters"), 0)
    }

    /// `inner` between the literal texts `before` and `after` (either may be empty) — a tool
    /// call's tags.
    fn between(&mut self, before: &str, inner: NodeId, after: &str) -> Result<NodeId, SchemaError> {
        let mut parts = Vec::new();
        for (text, is_inner) in [(before, false), ("", true), (after, false)] {
            if is_inner {
                parts.push(inner);
            } else if !text.is_empty() {
                parts.push(self.push(Node::Literals(vec![text.as_bytes().into()]), "tools")?);
            }
        }
        match parts.as_slice() {
            [only] => Ok(*only),
            _ => self.push(Node::Seq(parts.into()), "tools"),
        }
    }

    fn push(&mut self, n: Node, path: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return err(path, "the schema is too large");
        }
        // Positions inside a literal or a key are counted in 16 bits.
        let too_long = match &n {
            Node::Literals(l) => l.iter().any(|t| t.len() > MAX_LITERAL),
            Node::Object { props, .. } => props.iter().any(|p| p.key.len() > MAX_LITERAL),
            _ => false,
        };
        if too_long {
            return err(
                path,
                format!("a value or key is longer than {MAX_LITERAL} bytes"),
            );
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn node(&mut self, s: &Value, path: &str, depth: usize) -> Result<NodeId, SchemaError> {
        if depth > 64 {
            return err(path, "the schema is nested too deeply");
        }
        let m = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return err(path, "the schema `false` allows no value"),
            Value::Object(m) => m,
            _ => return err(path, "a schema must be an object or a boolean"),
        };
        if let Some(k) = m
            .keys()
            .map(String::as_str)
            .find(|k| UNSUPPORTED.contains(k))
        {
            return err(path, format!("`{k}` is not supported"));
        }
        if let Some(r) = s.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| SchemaError {
                    path: path.into(),
                    message: "`$ref` must be a string".into(),
                })?
                .to_owned();
            if let Some(&id) = self.refs.get(&r) {
                return Ok(id);
            }
            let target = self.pointer(&r, path)?;
            let slot = self.push(Node::Alias(ANY), path)?;
            self.refs.insert(r.clone(), slot);
            let id = self.node(target, &r, depth + 1)?;
            self.nodes[usize::from(slot)] = Node::Alias(id);
            return Ok(slot);
        }
        if let Some(c) = s.get("const") {
            return self.push(
                Node::Literals(vec![c.to_string().into_bytes().into()]),
                path,
            );
        }
        if let Some(e) = s.get("enum") {
            let Value::Array(values) = e else {
                return err(path, "`enum` must be an array");
            };
            if values.is_empty() || values.len() > usize::from(u16::MAX) {
                return err(path, "`enum` must list 1 to 65535 values");
            }
            let mut lits: Vec<Box<[u8]>> = Vec::new();
            for v in values {
                let t: Box<[u8]> = v.to_string().into_bytes().into();
                if !lits.contains(&t) {
                    lits.push(t);
                }
            }
            return self.push(Node::Literals(lits), path);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = s.get(key) {
                let Value::Array(alts) = alts else {
                    return err(path, format!("`{key}` must be an array of schemas"));
                };
                if alts.is_empty() {
                    return err(path, format!("`{key}` must not be empty"));
                }
                let ids = alts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| self.node(a, &format!("{path}/{key}/{i}"), depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                return self.one_of(ids, &format!("{path}/{key}"));
            }
        }
        if let Some(all) = s.get("allOf") {
            return match all {
                Value::Array(a) if a.len() == 1 => {
                    self.node(&a[0], &format!("{path}/allOf/0"), depth + 1)
                }
                _ => err(path, "`allOf` is supported with one schema only"),
            };
        }
        match s.get("type") {
            None => {
                if let Some(k) = [
                    "minimum",
                    "maximum",
                    "exclusiveMinimum",
                    "exclusiveMaximum",
                    "multipleOf",
                ]
                .into_iter()
                .find(|k| s.get(k).is_some())
                {
                    return err(
                        path,
                        format!("`{k}` needs `type` \"number\" or \"integer\" beside it"),
                    );
                }
                if s.get("pattern").is_some() {
                    return err(path, "`pattern` needs `type` \"string\" beside it");
                }
                if s.get("properties").is_some() || s.get("required").is_some() {
                    self.typed(s, "object", path, depth)
                } else if s.get("items").is_some() || s.get("prefixItems").is_some() {
                    self.typed(s, "array", path, depth)
                } else {
                    Ok(ANY)
                }
            }
            Some(Value::String(t)) => self.typed(s, t, path, depth),
            Some(Value::Array(types)) if !types.is_empty() => {
                let mut ids = Vec::new();
                for t in types {
                    let Some(t) = t.as_str() else {
                        return err(path, "`type` must be a string or a list of strings");
                    };
                    ids.push(self.typed(s, t, path, depth)?);
                }
                self.one_of(ids, &format!("{path}/type"))
            }
            Some(_) => err(path, "`type` must be a string or a list of strings"),
        }
    }

    /// Alternatives: literal ones merged into one set (they are told apart byte by byte).
    fn one_of(&mut self, ids: Vec<NodeId>, path: &str) -> Result<NodeId, SchemaError> {
        let mut lits: Vec<Box<[u8]>> = Vec::new();
        let mut rest = Vec::new();
        for id in ids {
            match &self.nodes[usize::from(id)] {
                Node::Literals(l) => {
                    for t in l {
                        if !lits.contains(t) {
                            lits.push(t.clone());
                        }
                    }
                }
                _ => rest.push(id),
            }
        }
        if !lits.is_empty() {
            let id = self.push(Node::Literals(lits), path)?;
            rest.push(id);
        }
        if rest.len() == 1 {
            return Ok(rest[0]);
        }
        self.push(Node::OneOf(rest), path)
    }

    fn typed(
        &mut self,
        s: &Value,
        t: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        match t {
            "object" => self.object(s, path, depth),
            "array" => {
                // A tuple: `prefixItems` (2020-12, pydantic's `tuple[…]`) then `items` for
                // the rest, or the older `items: […]` then `additionalItems`.
                let (prefix_key, rest_key) = match (s.get("prefixItems"), s.get("items")) {
                    (Some(_), _) => ("prefixItems", "items"),
                    (None, Some(Value::Array(_))) => ("items", "additionalItems"),
                    _ => ("", "items"),
                };
                let mut prefix = Vec::new();
                if let Some(p) = s.get(prefix_key) {
                    let Value::Array(p) = p else {
                        return err(path, format!("`{prefix_key}` must be an array of schemas"));
                    };
                    for (i, item) in p.iter().enumerate() {
                        prefix.push(self.node(
                            item,
                            &format!("{path}/{prefix_key}/{i}"),
                            depth + 1,
                        )?);
                    }
                }
                let mut max = count(s, "maxItems", path)?.unwrap_or(UNBOUNDED);
                let items = match s.get(rest_key) {
                    None | Some(Value::Bool(true)) => ANY,
                    // No items past the tuple's.
                    Some(Value::Bool(false)) => {
                        max = max.min(prefix.len() as u32);
                        ANY
                    }
                    Some(i) => self.node(i, &format!("{path}/{rest_key}"), depth + 1)?,
                };
                let min = count(s, "minItems", path)?.unwrap_or(0);
                if min > max {
                    return err(
                        path,
                        "`minItems` is above `maxItems` (or the tuple's length)",
                    );
                }
                if prefix.len() > usize::from(u16::MAX) {
                    return err(path, "a tuple of more than 65535 items");
                }
                let prefix = prefix.into();
                self.push(
                    Node::Array {
                        items,
                        min,
                        max,
                        prefix,
                    },
                    path,
                )
            }
            "string" => {
                let min = count(s, "minLength", path)?.unwrap_or(0);
                let max = count(s, "maxLength", path)?.unwrap_or(UNBOUNDED);
                if min > max {
                    return err(path, "`minLength` is above `maxLength`");
                }
                let source = match (s.get("pattern"), s.get("format")) {
                    (Some(Value::String(p)), _) => Some(p.as_str()),
                    (Some(_), _) => return err(path, "`pattern` must be a string"),
                    (None, Some(Value::String(f))) => format_pattern(f),
                    (None, _) => None,
                };
                let pattern = match source {
                    None if min == 0 && max == UNBOUNDED => return Ok(ANY_STRING),
                    None => None,
                    Some(p) => Some(Arc::new(Pattern::new(p, min, max).map_err(|m| {
                        SchemaError {
                            path: path.into(),
                            message: m,
                        }
                    })?)),
                };
                self.push(Node::String { min, max, pattern }, path)
            }
            "number" | "integer" => {
                let integer = t == "integer";
                let step = multiple_of(s, integer, path)?;
                let bounds = number_bounds(s, integer, path)?;
                if let (Some([lo, hi]), Some(step)) = (bounds, step) {
                    if hi.div_euclid(step) * step < lo {
                        return err(
                            path,
                            format!("no {t} between the bounds is a multiple of `multipleOf`"),
                        );
                    }
                }
                match bounds {
                    None if !integer && step.is_none() => Ok(ANY_NUMBER),
                    // A step is followed on the tracked value, which bounded numbers carry.
                    None if step.is_some() => {
                        let reach = NUM_MAX_INT * NUM_SCALE + (NUM_SCALE - 1);
                        let bounds = Some([-reach, reach]);
                        self.push(
                            Node::Number {
                                integer,
                                bounds,
                                step,
                            },
                            path,
                        )
                    }
                    bounds => self.push(
                        Node::Number {
                            integer,
                            bounds,
                            step,
                        },
                        path,
                    ),
                }
            }
            "boolean" => self.push(
                Node::Literals(vec![b"true"[..].into(), b"false"[..].into()]),
                path,
            ),
            "null" => self.push(Node::Literals(vec![b"null"[..].into()]), path),
            other => err(path, format!("unknown `type` \"{other}\"")),
        }
    }

    fn object(&mut self, s: &Value, path: &str, depth: usize) -> Result<NodeId, SchemaError> {
        let required: Vec<&str> = match s.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
            Some(_) => return err(path, "`required` must be a list of property names"),
        };
        let mut props = Vec::new();
        match s.get("properties") {
            None => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let value = self.node(v, &format!("{path}/properties/{k}"), depth + 1)?;
                    props.push(Prop {
                        key: json_string(k).into_bytes().into(),
                        value,
                        required: required.contains(&k.as_str()),
                    });
                }
            }
            Some(_) => return err(path, "`properties` must be an object"),
        }
        // A required name without a declared schema: any value.
        for r in &required {
            let key: Box<[u8]> = json_string(r).into_bytes().into();
            if !props.iter().any(|p| p.key == key) {
                props.push(Prop {
                    key,
                    value: ANY,
                    required: true,
                });
            }
        }
        if props.len() > 1024 {
            return err(path, "more than 1024 properties");
        }
        // Free keys only where nothing is declared (declared ones are what the answer gives).
        let extra = if !props.is_empty() {
            None
        } else {
            match s.get("additionalProperties") {
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(Value::Bool(false)) => None,
                Some(a) => {
                    Some(self.node(a, &format!("{path}/additionalProperties"), depth + 1)?)
                }
            }
        };
        if props.is_empty() && extra == Some(ANY) {
            return Ok(ANY_OBJECT);
        }
        self.push(
            Node::Object {
                props,
                extra,
                one: false,
            },
            path,
        )
    }

    /// The part of the root a local `$ref` names (`#`, `#/$defs/Name`, any JSON pointer).
    fn pointer(&self, r: &str, path: &str) -> Result<&'a Value, SchemaError> {
        let Some(rest) = r.strip_prefix('#') else {
            return err(
                path,
                format!("only local `$ref`s (\"#/…\") are supported: \"{r}\""),
            );
        };
        let mut at = self.root;
        for part in rest.split('/').skip(1) {
            let part = part.replace("~1", "/").replace("~0", "~");
            at = match at {
                Value::Object(m) => m.get(&part),
                Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .ok_or_else(|| SchemaError {
                path: path.into(),
                message: format!("`$ref` \"{r}\" names nothing in the schema"),
            })?;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::json_mode::JsonPaths;
    use serde_json::json;

    fn grammar(schema: Value) -> Grammar {
        Grammar::from_schema(&schema).unwrap_or_else(|e| panic!("{schema}: {e}"))
    }

    fn run(g: &Grammar, text: &str) -> Option<JsonPaths> {
        JsonPaths::default().after_bytes(g, text.as_bytes())
    }

    /// Every text complete, every proper prefix accepted and open; every bad text rejected.
    fn check(g: &Grammar, good: &[&str], bad: &[&str]) {
        for t in good {
            let s = run(g, t).unwrap_or_else(|| panic!("rejected {t}"));
            assert!(s.is_done() || s.can_end(g), "not complete: {t}");
            for i in 0..t.len() {
                let p = JsonPaths::default().after_bytes(g, &t.as_bytes()[..i]);
                assert!(p.is_some_and(|p| !p.is_done()), "{t}: prefix of {i} bytes");
            }
        }
        for t in bad {
            assert!(
                run(g, t).is_none_or(|s| !s.is_done() && !s.can_end(g)),
                "accepted {t}"
            );
        }
    }

    #[test]
    fn objects_give_declared_properties_in_order_required_ones_always() {
        let g = grammar(json!({"type": "object", "properties": {
            "name": {"type": "string", "description": "ignored"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "role": {"enum": ["admin", "user"]},
            "score": {"type": "number", "format": "double"},
            "ok": {"type": "boolean"}},
            "required": ["name", "age"]}));
        check(
            &g,
            &[
                r#"{"name": "Ada", "age": 36}"#,
                r#"{"name":"Ada","age":-1,"tags":["a","b"],"role":"user","score":1.5e3,"ok":true}"#,
                "{\n  \"name\": \"\\u00e9\",\n  \"age\": 0,\n  \"role\": \"admin\"\n}",
                r#"{"name": "", "age": 7, "tags": [], "ok": false}"#,
            ],
            &[
                r#"{"age": 36, "name": "Ada"}"#,
                r#"{"name": "Ada"}"#,
                r#"{"name": "Ada", "age": 3.5}"#,
                r#"{"name": "Ada", "age": 1e3}"#,
                r#"{"name": "Ada", "age": 36, "tags": ["a", "b", "c"]}"#,
                r#"{"name": "Ada", "age": 36, "tags": [1]}"#,
                r#"{"name": 1, "age": 36}"#,
                r#"{"name": "Ada", "age": 36, "other": 1}"#,
                r#"{"name": "Ada", "age": 36, "role": "root"}"#,
                r#"{"name": "Ada", "age": 36, "ok": 1}"#,
                r#"{"name": "Ada", "age": 36, "role": "user", "tags": []}"#,
                r#"{"name": "Ada", "name": "Bo", "age": 36}"#,
                r#"{"name": "Ada", "age": 36,}"#,
                r#"[]"#,
            ],
        );
    }

    #[test]
    fn refs_alternatives_and_recursion() {
        // What pydantic writes for `pets: list[Pet]` with `age: int | None`.
        let g = grammar(json!({
            "$defs": {"Pet": {"type": "object", "title": "Pet", "properties": {
                "kind": {"type": "string", "enum": ["cat", "dog", "dodo"]},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}},
                "required": ["kind", "age"]}},
            "type": "object",
            "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"},
                                    "minItems": 1}},
            "required": ["pets"]}));
        check(
            &g,
            &[r#"{"pets": [{"kind": "cat", "age": null}, {"kind": "dodo", "age": 3}]}"#],
            &[
                r#"{"pets": []}"#,
                r#"{"pets": [{"kind": "cow", "age": 1}]}"#,
                r#"{"pets": [{"kind": "do", "age": 1}]}"#,
                r#"{"pets": [{"kind": "dog", "age": "3"}]}"#,
            ],
        );
        let tree = grammar(json!({"type": "object", "properties": {
            "value": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["value", "children"]}));
        check(
            &tree,
            &[
                r#"{"value": 1, "children": [{"value": 2, "children": []}, {"value": 3, "children": [{"value": 4, "children": []}]}]}"#,
            ],
            &[r#"{"value": 1, "children": [{"value": 2}]}"#],
        );
        let nullable = grammar(json!({"type": ["string", "null"]}));
        check(&nullable, &[r#""x""#, "null"], &["nul", "1", "[]"]);
    }

    #[test]
    fn alternatives_that_start_alike_are_followed_until_the_text_tells_them_apart() {
        // pydantic's `pet: Cat | Dog`: two objects, told apart by their first key's value.
        let pets = grammar(json!({
            "$defs": {
                "Cat": {"type": "object", "properties": {
                    "kind": {"const": "cat"}, "meows": {"type": "boolean"}},
                    "required": ["kind", "meows"]},
                "Dog": {"type": "object", "properties": {
                    "kind": {"const": "dog"}, "barks": {"type": "integer", "maximum": 9}},
                    "required": ["kind", "barks"]}},
            "type": "object",
            "properties": {"pet": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
            "required": ["pet"]}));
        check(
            &pets,
            &[
                r#"{"pet": {"kind": "cat", "meows": true}}"#,
                r#"{"pet": {"kind": "dog", "barks": 3}}"#,
            ],
            &[
                r#"{"pet": {"kind": "cat", "barks": 3}}"#,
                r#"{"pet": {"kind": "dog", "meows": true}}"#,
                r#"{"pet": {"kind": "dog", "barks": 10}}"#,
                r#"{"pet": {"kind": "cow", "barks": 1}}"#,
                r#"{"pet": {"kind": "cat"}}"#,
            ],
        );
        // Same first key, told apart later; `oneOf` is followed as `anyOf`.
        let contact = grammar(json!({"oneOf": [
            {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
            {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
             "required": ["name", "email"]}]}));
        check(
            &contact,
            &[
                r#"{"name": "Ada", "age": 36}"#,
                r#"{"name": "Ada", "email": "a@b.c"}"#,
            ],
            &[
                r#"{"name": "Ada"}"#,
                r#"{"name": "Ada", "age": "36"}"#,
                r#"{"name": "Ada", "email": 1}"#,
                r#"{"name": "Ada", "age": 36, "email": "a@b.c"}"#,
            ],
        );
        let s = run(&contact, r#"{"name": "Ada", "#).expect("open");
        assert_eq!(
            s.len(),
            2,
            "both readings alive until a key tells them apart"
        );
        assert_eq!(
            run(&contact, r#"{"name": "Ada", "a"#).expect("open").len(),
            1
        );
        // `integer` or `number`, with bounds of their own; a string or an enum.
        let n = grammar(json!({"anyOf": [{"type": "integer", "maximum": 5},
                                         {"type": "number", "minimum": 100}]}));
        // (A bounded number is written without an exponent.)
        check(
            &n,
            &["3", "-2", "100", "150.5", "1000"],
            &["7", "50", "4.5", "99.9", "1e3"],
        );
        let both = grammar(json!({"type": ["integer", "number"]}));
        check(&both, &["3", "3.5", "-1e-3"], &["x", "1."]);
        let text = grammar(json!({"anyOf": [{"type": "string", "maxLength": 3},
                                            {"enum": ["hello world", 7]}]}));
        check(
            &text,
            &[r#""ab""#, r#""hello world""#, "7"],
            &[r#""hello""#, r#""hello world!""#, "8"],
        );
        // Items of an array, and alternatives nested in alternatives.
        let items = grammar(json!({"type": "array", "items": {"anyOf": [
            {"type": "integer"}, {"type": "number"}, {"type": "string", "format": "date"},
            {"type": "string", "maxLength": 2}]}}));
        check(
            &items,
            &[r#"[1, 2.5, "2024-02-29", "ab", -3]"#, "[]"],
            &[r#"["abc"]"#, r#"["2023-02-29"]"#],
        );
        let after = run(&items, r#"[1, 2.5, "2024-02-29", "ab", "#).expect("open");
        assert_eq!(after.len(), 1, "closed items leave one reading");
        let nested = grammar(json!({"anyOf": [
            {"anyOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
            {"type": "object", "properties": {"c": {"type": "null"}}, "required": ["c"]},
            {"type": "object"}]}));
        check(
            &nested,
            &[
                r#"{"a": 1}"#,
                r#"{"b": 2}"#,
                r#"{"c": null}"#,
                r#"{"a": "x", "z": []}"#,
                "{}",
            ],
            &[r#"[]"#, r#"{"a": 1"#],
        );
    }

    #[test]
    fn tuples_give_each_place_its_own_schema() {
        // pydantic's `tuple[float, str]`.
        let pair = grammar(json!({"type": "array", "minItems": 2, "maxItems": 2,
            "prefixItems": [{"type": "number"}, {"type": "string", "maxLength": 3}]}));
        check(
            &pair,
            &[r#"[1.5, "abc"]"#, r#"[-2,""]"#],
            &[
                r#"["abc", 1.5]"#,
                r#"[1.5]"#,
                r#"[1.5, "abc", 2]"#,
                r#"[1.5, "abcd"]"#,
            ],
        );
        // `tuple[int, ...]`-like: the first place fixed, any number of strings after it.
        let head = grammar(json!({"prefixItems": [{"type": "integer"}],
                                  "items": {"type": "string"}}));
        check(
            &head,
            &["[]", "[1]", r#"[1, "a", "b"]"#],
            &[r#"["a"]"#, "[1, 2]"],
        );
        // `items: false` ends the array with the tuple; the older `items: [...]` form.
        let closed = grammar(
            json!({"prefixItems": [{"type": "boolean"}, {"type": "null"}],
                                    "items": false}),
        );
        check(
            &closed,
            &["[]", "[true]", "[false, null]"],
            &["[true, null, 1]", "[null]"],
        );
        let old = grammar(
            json!({"type": "array", "items": [{"type": "integer"}, {"enum": ["x"]}],
                                 "additionalItems": {"type": "boolean"}}),
        );
        check(
            &old,
            &[r#"[1, "x", true, false]"#],
            &[r#"[1, "y"]"#, r#"[1, "x", 2]"#],
        );
        let err = Grammar::from_schema(&json!({"prefixItems": [{}], "items": false,
                                               "minItems": 2}))
        .expect_err("no array fits");
        assert!(err.message.contains("tuple's length"), "{err}");
    }

    /// llama.cpp's `grammars/json.gbnf`.
    const JSON_GBNF: &str = include_str!("../../tests/grammars/json.gbnf");

    const ARITHMETIC_GBNF: &str = "root ::= expr\n\
        expr ::= term ((\"+\" | \"-\") term)*\n\
        term ::= factor ((\"*\" | \"/\") factor)*\n\
        factor ::= [0-9]+ | \"(\" expr \")\"\n";

    #[test]
    fn recursive_gbnf_grammars_are_followed() {
        let json = Grammar::gbnf(JSON_GBNF).unwrap_or_else(|e| panic!("{e}"));
        check(
            &json,
            &[
                "{}",
                r#"{"a": [1, 2.5, {"b": null}], "c": "x\n\u00e9"}"#,
                "{\n  \"deep\": [[[], [true]], {\"k\": -0.5e+3}]\n}",
            ],
            &[
                "[1]",
                r#"{"a" 1}"#,
                r#"{"a": [1,]}"#,
                r#"{"a":  1}"#,
                r#"{"a": tru}"#,
                r#"{"a": 01}"#,
            ],
        );
        let arith = Grammar::gbnf(ARITHMETIC_GBNF).unwrap_or_else(|e| panic!("{e}"));
        check(
            &arith,
            &["1+2*(3-4)", "((7))", "12/(3+(4*5))-6", "0"],
            &["1+", "(1", "1)", "()", "+1", "1+*2"],
        );
        // Pieces that can be empty, and nesting through them.
        let list = Grammar::gbnf(
            "root ::= list\nlist ::= \"[\" (item (\",\" item)*)? \"]\"\nitem ::= [a-z]* | list\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        check(
            &list,
            &["[]", "[,]", "[a,[b,[]],]", "[[[x]]]"],
            &["[a", "[[]", "a", "[A]"],
        );
        // A regular grammar stays one pattern.
        let regular = Grammar::gbnf("root ::= \"a\" b\nb ::= \"b\"+").expect("regular");
        assert!(!regular.has_pieces());
        assert!(json.has_pieces());
        for (g, says) in [
            ("root ::= root \"a\" | \"b\"", "left recursion"),
            (
                "root ::= x\nx ::= y \"a\"\ny ::= \"b\"? x",
                "left recursion",
            ),
            ("root ::= \"(\" root \")\" | item", "not defined"),
        ] {
            let e = Grammar::gbnf(g)
                .err()
                .unwrap_or_else(|| panic!("accepted {g}"));
            assert!(e.contains(says), "{g}: {e}");
        }
    }

    /// Random walks over the bytes `bytes` the recogniser allows under `g`: from every text
    /// some byte goes on, or the text may end there.
    fn assert_no_dead_end(
        g: &Grammar,
        label: &str,
        walks: usize,
        steps: usize,
        bytes: std::ops::Range<u8>,
        seed: u64,
    ) {
        let mut rand = crate::engine::xorshift(seed);
        for _ in 0..walks {
            let mut s = JsonPaths::default();
            let mut text = Vec::new();
            for _ in 0..steps {
                let next: Vec<(u8, JsonPaths)> = bytes
                    .clone()
                    .filter_map(|b| Some((b, s.after_bytes(g, &[b])?)))
                    .collect();
                assert!(
                    !next.is_empty() || s.can_end(g),
                    "{label}: dead end after {:?}",
                    String::from_utf8_lossy(&text)
                );
                if next.is_empty() || s.is_done() {
                    break;
                }
                let (b, t) = next[rand(next.len())].clone();
                text.push(b);
                s = t;
            }
        }
    }

    #[test]
    fn no_walk_through_a_recursive_grammar_reaches_a_dead_end() {
        for (label, src, seed) in [
            ("json.gbnf", JSON_GBNF, 0x0123456789ABCDEF),
            ("arithmetic", ARITHMETIC_GBNF, 0x2545F4914F6CDD1D),
        ] {
            let g = Grammar::gbnf(src).unwrap_or_else(|e| panic!("{e}"));
            assert_no_dead_end(&g, label, 100, 30, 0x09..0x7f, seed);
        }
    }

    #[test]
    fn no_walk_through_alternatives_reaches_a_dead_end() {
        let schemas = [
            json!({"anyOf": [
                {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer", "minimum": 3, "maximum": 40}}, "required": ["kind", "x"]},
                {"type": "object", "properties": {"kind": {"const": "ab"}, "y": {"type": "string", "maxLength": 2}}, "required": ["kind", "y"]},
                {"type": "object", "properties": {"kind": {"type": "string", "pattern": "^b+$"}}, "required": ["kind"]}]}),
            json!({"type": "array", "items": {"anyOf": [
                {"type": "integer", "maximum": 5}, {"type": "number", "minimum": 100},
                {"enum": ["x", "xy", 12]}, {"type": "string", "maxLength": 1}]}, "maxItems": 4}),
        ];
        for schema in &schemas {
            assert_no_dead_end(
                &grammar(schema.clone()),
                &schema.to_string(),
                150,
                60,
                0x20..0x7f,
                0x2545F4914F6CDD1D,
            );
        }
    }

    #[test]
    fn strings_numbers_literals_and_free_objects() {
        let s = grammar(json!({"type": "string", "minLength": 2, "maxLength": 3}));
        check(
            &s,
            &[r#""ab""#, r#""é€x""#, r#""\n\u00e9""#],
            &[r#""a""#, r#""abcd""#, r#""é€xy""#],
        );
        // A top-level number or literal that could go on may end (the stop token is allowed).
        let n = grammar(json!({"type": "integer"}));
        check(&n, &["42", "-7", "0"], &["4.2", "01", "-", "1e5"]);
        let e = grammar(json!({"enum": [1, 10, "a", {"k": [true, null]}]}));
        check(
            &e,
            &["1", "10", r#""a""#, r#"{"k":[true,null]}"#],
            &["2", "100", r#"{"k": [true, null]}"#],
        );
        assert!(run(&e, "10").is_some_and(|s| s.is_done()));
        assert!(run(&e, "1").is_some_and(|s| !s.is_done() && s.can_end(&e)));
        let c = grammar(json!({"const": "fixed"}));
        check(&c, &[r#""fixed""#], &[r#""fixe""#, r#""fixed2""#]);
        let map = grammar(json!({"type": "object", "additionalProperties": {"type": "integer"}}));
        check(
            &map,
            &["{}", r#"{"a": 1, "b": 2}"#],
            &[r#"{"a": "x"}"#, r#"{"a": 1.5}"#],
        );
        let closed = grammar(json!({"type": "object", "additionalProperties": false}));
        check(&closed, &["{}", "{ }"], &[r#"{"a": 1}"#]);
        let any = grammar(json!({}));
        check(
            &any,
            &["[1, {\"a\": [null]}]", "\"s\"", "true", "{}"],
            &["{]", "tru"],
        );
    }

    #[test]
    fn numbers_keep_to_multiple_of() {
        let g = grammar(json!({"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}));
        check(&g, &["0", "15", "100", "95"], &["17", "105", "-5", "1.0"]);
        // A digit only where a multiple can still follow: "1" (10, 15), not "10" + "1".
        assert!(run(&g, "1").is_some() && run(&g, "101").is_none());
        assert!(
            run(&g, "11").is_none(),
            "no multiple of 5 in 110..119 within 100"
        );
        let g = grammar(json!({"type": "number", "multipleOf": 0.25}));
        check(
            &g,
            &["0.75", "1.5", "-2.25", "3", "0.250"],
            &["0.3", "1.1", "2e1", "0.7"],
        );
        assert!(
            run(&g, "0.3").is_none(),
            "nothing in 0.3..0.4 is a multiple of 0.25"
        );
        assert!(run(&g, "0.7").is_some(), "0.75 may follow");
        // An integer's multiple of 0.5 is any integer; of 1.5, the multiples of 3.
        check(
            &grammar(json!({"type": "integer", "multipleOf": 0.5})),
            &["7", "-3"],
            &["7.5"],
        );
        check(
            &grammar(json!({"type": ["integer", "null"], "multipleOf": 1.5})),
            &["6", "-9", "null"],
            &["4", "1"],
        );
    }

    #[test]
    fn integers_keep_to_their_bounds() {
        // pydantic: `conint(ge=1, le=5)`, `Field(gt=0, lt=100)`, a negative range.
        let g = grammar(json!({"type": "object", "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "pct": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
            "t": {"type": "integer", "minimum": -20, "maximum": -3}},
            "required": ["stars", "pct", "t"]}));
        check(
            &g,
            &[
                r#"{"stars": 1, "pct": 1, "t": -3}"#,
                r#"{"stars": 5, "pct": 99, "t": -20}"#,
                r#"{"stars":3,"pct":50,"t":-15}"#,
            ],
            &[
                r#"{"stars": 0, "pct": 1, "t": -3}"#,
                r#"{"stars": 6, "pct": 1, "t": -3}"#,
                r#"{"stars": 10, "pct": 1, "t": -3}"#,
                r#"{"stars": -1, "pct": 1, "t": -3}"#,
                r#"{"stars": 1, "pct": 0, "t": -3}"#,
                r#"{"stars": 1, "pct": 100, "t": -3}"#,
                r#"{"stars": 1, "pct": 1, "t": -2}"#,
                r#"{"stars": 1, "pct": 1, "t": -21}"#,
                r#"{"stars": 1, "pct": 1, "t": 3}"#,
                r#"{"stars": 1, "pct": 1, "t": -0}"#,
                r#"{"stars": 2.0, "pct": 1, "t": -3}"#,
            ],
        );
        // The dead end is refused at its byte: after "5" no digit may follow.
        let s = run(&g, r#"{"stars": 5"#).expect("in range so far");
        assert!(s.after_bytes(&g, b"0").is_none());
        assert!(run(&g, r#"{"stars": 7"#).is_none());
        // Only a lower bound: any size up to the 32-bit integer part.
        let g = grammar(json!({"type": "integer", "minimum": 0}));
        check(
            &g,
            &["0", "7", "123456", "4294967295"],
            &["-1", "-0", "4294967296"],
        );
    }

    #[test]
    fn numbers_keep_to_their_bounds_exactly() {
        // pydantic `confloat(ge=0, le=1)`.
        let g = grammar(json!({"type": "number", "minimum": 0, "maximum": 1}));
        check(
            &g,
            &["0", "1", "0.5", "0.123456789", "1.0", "1.000000000", "0.0"],
            &[
                "1.1",
                "1.0000001",
                "-0.1",
                "-0",
                "2",
                "10",
                "1e0",
                "0.5e1",
                "0.1234567891",
                "-1",
            ],
        );
        // Bounds that are not whole: exact at 9 decimals, whatever their binary form.
        let g = grammar(json!({"type": "number", "exclusiveMinimum": 0.5, "maximum": 0.3e1}));
        check(
            &g,
            &["0.500000001", "0.6", "3", "2.999999999", "3.000"],
            &["0.5", "0.4999", "0.500000000", "3.000000001", "-1"],
        );
        // Draft 4's boolean `exclusiveMaximum`, a negative float range.
        let g = grammar(json!({"type": "number", "minimum": -2.5, "maximum": -1,
                               "exclusiveMaximum": true}));
        check(
            &g,
            &["-2.5", "-1.5", "-1.000000001", "-2"],
            &["-1", "-1.0", "-2.6", "0", "-0.5", "-3"],
        );
        // The bounds are part of what a grammar allows: different bounds, different grammar.
        let a = grammar(json!({"type": "number", "maximum": 1}));
        let b = grammar(json!({"type": "number", "maximum": 2}));
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn unsupported_schemas_are_refused_where_they_fail() {
        for (schema, path, says) in [
            (
                json!({"properties": {"x": {"type": "string", "pattern": "(?=a)b"}}}),
                "#/properties/x",
                "cannot be followed",
            ),
            (
                json!({"properties": {"x": {"type": "string", "pattern": "^ab$", "maxLength": 1}}}),
                "#/properties/x",
                "no string",
            ),
            (json!({"pattern": "^a"}), "#", "`type` \"string\""),
            (
                json!({"type": "string", "pattern": 3}),
                "#",
                "must be a string",
            ),
            (
                json!({"type": "integer", "multipleOf": 0}),
                "#",
                "`multipleOf` must be above 0",
            ),
            (
                json!({"type": "number", "multipleOf": 1e-10}),
                "#",
                "9 decimals",
            ),
            (json!({"multipleOf": 2}), "#", "`type`"),
            (
                json!({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4}),
                "#",
                "no integer",
            ),
            (json!({"minimum": 0}), "#", "`type`"),
            (
                json!({"properties": {"n": {"type": "integer", "minimum": 5, "maximum": 3}}}),
                "#/properties/n",
                "no integer",
            ),
            (
                json!({"type": "integer", "minimum": 0.25, "maximum": 0.75}),
                "#",
                "no integer",
            ),
            (
                json!({"type": "number", "minimum": 1e10}),
                "#",
                "4294967295",
            ),
            (
                json!({"type": "number", "maximum": "1"}),
                "#",
                "must be a number",
            ),
            (json!({"$ref": "#/$defs/Missing"}), "#", "names nothing"),
            (
                json!({"$ref": "https://example.com/s.json"}),
                "#",
                "only local",
            ),
            (json!({"$ref": "#"}), "#", "never reaches"),
            (json!({"type": "date"}), "#", "unknown `type`"),
            (
                json!({"properties": {"x": false}}),
                "#/properties/x",
                "allows no value",
            ),
            (
                json!({"type": "string", "minLength": 3, "maxLength": 2}),
                "#",
                "above",
            ),
            (json!({"allOf": [{}, {}]}), "#", "one schema"),
            (json!([1]), "#", "an object or a boolean"),
        ] {
            let e = Grammar::from_schema(&schema).expect_err(&schema.to_string());
            assert_eq!(e.path, path, "{schema}: {e}");
            assert!(e.message.contains(says), "{schema}: {e}");
        }
    }

    #[test]
    fn strings_keep_to_their_pattern_or_format() {
        let g = grammar(json!({"type": "object", "properties": {
            "phone": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"},
            "day": {"type": "string", "format": "date"},
            "tag": {"type": "string", "pattern": "^#[a-z]+$", "minLength": 3, "maxLength": 5},
            "note": {"type": "string", "pattern": "ok"},
            "color": {"type": "string", "format": "color"}},
            "required": ["phone", "day"]}));
        check(
            &g,
            &[
                r##"{"phone": "555-1234", "day": "2026-12-07"}"##,
                r##"{"phone":"555-1234","day":"2000-02-29","tag":"#ab","note":"it is ok!","color":"x"}"##,
                r##"{"phone": "555-1234", "day": "2026-01-31", "tag": "#abcd"}"##,
                // Escapes are judged by the characters they stand for.
                r##"{"phone": "555-1234", "day": "2026-01-31", "note": "\"ok\"\n\u0009"}"##,
            ],
            &[
                r##"{"phone": "5551234", "day": "2026-12-07"}"##,
                r##"{"phone": "555-1234", "day": "2026-13-07"}"##,
                r##"{"phone": "555-1234", "day": "2026-12-07", "tag": "#a"}"##,
                r##"{"phone": "555-1234", "day": "2026-12-07", "tag": "#abcde"}"##,
                r##"{"phone": "555-1234", "day": "2026-12-07", "note": "o k"}"##,
                // `\d` is ASCII, and a character has one form: no `\u` for a digit.
                r##"{"phone": "٥55-1234", "day": "2026-12-07"}"##,
                r##"{"phone": "\u0035\u0035\u0035-1234", "day": "2026-12-07"}"##,
            ],
        );
        // A byte is refused where it leaves the pattern, not at the closing quote.
        assert!(run(&g, r##"{"phone": "55a"##).is_none());
        assert!(run(&g, r##"{"phone": "555-12"##).is_some());
        assert!(run(&g, r##"{"phone": "555-1234"##).is_some());
        assert!(run(&g, r##"{"phone": "555-12345"##).is_none());
        assert!(run(
            &g,
            r##"{"phone": "555-1234", "day": "2026-12-07", "tag": "#abcde"##
        )
        .is_none());
        // A `\` only where an escaped character can come: never in a phone number.
        assert!(run(&g, r##"{"phone": "\"##).is_none());
        assert!(run(
            &g,
            r##"{"phone": "555-1234", "day": "2026-12-07", "note": "\"##
        )
        .is_some());
        // A control character has only its `\u` form: `\` then `u` lead to it.
        let control = grammar(json!({"type": "string", "pattern": "^a\u{1}$"}));
        check(&control, &["\"a\\u0001\""], &["\"a\\n\""]);
        // The same pattern in another schema is the same grammar; another pattern is not.
        let again = grammar(json!({"type": "string", "pattern": "^a+$"}));
        let other = grammar(json!({"type": "string", "pattern": "^b+$"}));
        assert_eq!(
            grammar(json!({"type": "string", "pattern": "^a+$"})).id,
            again.id
        );
        assert_ne!(again.id, other.id);
    }

    #[test]
    fn a_regex_answer_is_raw_text_that_matches() {
        // Matched as a whole: no `^…$` needed.
        let g = Grammar::regex(r"(yes|no), because [a-z ]+\.").expect("compiles");
        let s = run(&g, "yes, because it rains").expect("prefix");
        assert!(!s.is_done() && !s.can_end(&g));
        let s = run(&g, "yes, because it rains.").expect("whole");
        assert!(s.is_done(), "nothing can follow the final `.`");
        assert!(run(&g, " yes").is_none() && run(&g, "maybe").is_none());
        assert!(run(&g, "no, because 2").is_none());
        // Open-ended: may end, may go on.
        let g = Grammar::regex(r"^[0-9]+$").expect("compiles");
        let s = run(&g, "42").expect("digits");
        assert!(!s.is_done() && s.can_end(&g));
        assert!(!JsonPaths::default().can_end(&g), "at least one digit");
        assert!(Grammar::regex("a?").is_ok_and(|g| JsonPaths::default().can_end(&g)));
        assert!(run(&Grammar::regex("a|b").expect("compiles"), "a").is_some_and(|s| s.is_done()));
        assert!(Grammar::regex("(a)\\1").is_err());
    }

    #[test]
    fn a_tool_call_is_one_tool_and_its_arguments_or_free_text_when_allowed() {
        let weather = json!({"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
            "required": ["city"], "$defs": {"Unit": {"enum": ["C", "F"]}}});
        let tools = [("get_weather", Some(&weather)), ("get_time", None)];
        let g = Grammar::tool_call(&tools, false).expect("grammar");
        check(
            &g,
            &[
                r#"{"get_weather": {"city": "Paris"}}"#,
                r#"{"get_weather": {"city": "Paris", "unit": "C"}}"#,
                r#" {"get_time": {}}"#,
                r#"{"get_time": {"tz": "UTC"}}"#,
            ],
            &[
                "{}",
                "Hello",
                r#"{"get_weather": {"city": "Paris"}, "get_time": {}}"#,
                r#"{"other": {}}"#,
                r#"{"get_weather": {}}"#,
                r#"{"get_weather": {"city": "Paris", "unit": "K"}}"#,
                r#"{"get_time": []}"#,
            ],
        );
        let auto = Grammar::tool_call(&tools, true).expect("grammar");
        check(&auto, &[r#"{"get_time": {}}"#], &[r#"{"nope": 1}"#]);
        for text in ["Hello", "  It is {sunny}", "\n😀"] {
            let s = run(&auto, text).unwrap_or_else(|| panic!("{text}"));
            assert!(s.is_free() && s.can_end(&auto) && !s.is_done(), "{text}");
        }
        // Before the first byte that decides, only whitespace is neither.
        assert!(run(&auto, "  ").is_some_and(|s| !s.is_free() && !s.can_end(&auto)));
        let bad = json!({"type": "object", "properties": {"q": {"pattern": "x"}}});
        let e = Grammar::tool_call(&[("search", Some(&bad))], false).expect_err("pattern");
        assert_eq!(e.path, "tools[0].function.parameters/properties/q");
        let long = "x".repeat(MAX_LITERAL + 1);
        let e = Grammar::from_schema(&json!({"enum": [long]})).expect_err("long");
        assert!(e.message.contains("longer than"), "{e}");
        let e = Grammar::from_schema(&json!({"properties": {long.clone(): {}}})).expect_err("key");
        assert!(e.message.contains("longer than"), "{e}");
    }

    #[test]
    fn a_choice_is_one_of_its_texts_exactly() {
        let c = Grammar::choice(&["positive", "negative", "neutral", "positive!", "negative"]);
        check(
            &c,
            &["positive", "negative", "neutral", "positive!"],
            &[
                " positive",
                "pos",
                "Positive",
                "negativ",
                "neutral ",
                "\"neutral\"",
            ],
        );
        assert!(run(&c, "positive").is_some_and(|s| !s.is_done() && s.can_end(&c)));
        assert!(run(&c, "negative").is_some_and(|s| s.is_done()));
        // The same literals as raw texts and as a JSON enum are different grammars.
        assert_ne!(
            Grammar::choice(&["1", "2"]).id,
            grammar(json!({"enum": [1, 2]})).id
        );
    }

    #[test]
    fn equal_schemas_name_the_same_grammar() {
        let a = json!({"type": "object", "properties": {"x": {"type": "integer"}}});
        let b = json!({"type": "object", "properties": {"x": {"type": "number"}}});
        assert_eq!(grammar(a.clone()).id, grammar(a).id);
        assert_ne!(grammar(b).id, Grammar::any_object().id);
        assert_eq!(Grammar::any_object().id, Grammar::any_object().id);
        // Property order is the schema's (serde_json keeps it: `preserve_order`).
        let ordered: Value =
            serde_json::from_str(r#"{"properties": {"z": {}, "a": {}}, "required": ["z", "a"]}"#)
                .expect("json");
        let g = grammar(ordered);
        assert!(run(&g, r#"{"z": 1, "a": 2}"#).is_some_and(|s| s.is_done()));
        assert!(run(&g, r#"{"a": 2"#).is_none());
    }
}
