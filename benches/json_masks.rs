//! The recogniser's allowed sets in isolation: milliseconds to compute one state's set over
//! the default model's vocabulary (49,152 tokens), for schema, pattern and GBNF states.
//!
//! `cargo bench --bench json_masks` (loads `NEXTOKEN_MODEL`, default
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf`, for its token table; one thread). Prints one JSON
//! line per state with the median of 9 runs. Under `cargo test` (no `--bench` argument) it
//! only checks on a small synthetic table that every state has a set.

use std::time::Instant;

use nextoken::engine::json_mode::{JsonPaths, TokenBytes};
use nextoken::engine::json_schema::Grammar;
use serde_json::json;

/// llama.cpp's `grammars/json.gbnf`.
const JSON_GBNF: &str = include_str!("../tests/grammars/json.gbnf");

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let tokens = if bench {
        let path = std::env::var("NEXTOKEN_MODEL")
            .unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        let (_, tokenizer) = nextoken::load(std::path::Path::new(&path)).expect("model loads");
        TokenBytes::new(tokenizer.token_bytes())
    } else {
        let texts: Vec<String> = (0..2000)
            .map(|i| format!("{}{}", i % 7, "ab\"{}[], :")[..=(i % 9)].to_string())
            .collect();
        TokenBytes::from_texts(&texts.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>())
    };
    let person = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "phone": {"type": "string", "pattern": "^\\+1-\\d{3}-\\d{3}-\\d{4}$"},
        "pet": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}}, "required": ["kind", "lives"]},
            {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}, "required": ["kind", "good"]}]}},
        "required": ["name", "age", "phone", "pet"]});
    let schema = Grammar::from_schema(&person).expect("schema");
    let gbnf = Grammar::gbnf(JSON_GBNF).expect("gbnf");
    let cases: [(&str, &Grammar, &str); 8] = [
        ("schema: object start", &schema, ""),
        ("schema: in a free string", &schema, r#"{"name": "Ad"#),
        (
            "schema: in a number",
            &schema,
            r#"{"name": "Ada", "age": 3"#,
        ),
        (
            "schema: in a pattern string",
            &schema,
            r#"{"name": "Ada", "age": 36, "phone": "+1-55"#,
        ),
        (
            "schema: two readings (union)",
            &schema,
            r#"{"name": "Ada", "age": 36, "phone": "+1-555-123-4567", "pet": {"kind": ""#,
        ),
        ("gbnf json: in a string", &gbnf, r#"{"name": "Ad"#),
        (
            "gbnf json: in a number",
            &gbnf,
            r#"{"name": "Ada", "age": 3"#,
        ),
        ("gbnf json: after a comma", &gbnf, r#"{"name": "Ada", "#),
    ];
    for (label, g, prefix) in cases {
        let state = JsonPaths::default()
            .after_bytes(g, prefix.as_bytes())
            .unwrap_or_else(|| panic!("{label}: the prefix fits"));
        let mut times = Vec::new();
        let mut allowed = 0;
        for _ in 0..if bench { 9 } else { 1 } {
            let t = Instant::now();
            let set = std::hint::black_box(tokens.allowed(g, &state));
            times.push(t.elapsed().as_secs_f64() * 1e3);
            allowed = set.iter().map(|w| w.count_ones()).sum::<u32>();
        }
        times.sort_by(f64::total_cmp);
        if bench {
            println!(
                "{}",
                json!({"state": label, "readings": state.len(), "allowed": allowed,
                       "ms": (times[times.len() / 2] * 100.0).round() / 100.0})
            );
        }
    }
}
