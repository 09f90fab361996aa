//! Fill-in-the-middle prompt assembly: exact token sequences for every template on tiny
//! tokenizers that contain the FIM tokens, repo-level context, and the prefix-only fallback.

mod common;

use common::word_tokenizer as tokenizer;
use nextoken::text::fim::{self, ExtraFile, FimInput, FimStyle};
use nextoken::text::{FimMode, FimTemplate, Tokenizer};

const WORDS: [&str; 8] = [
    "def",
    "f",
    "return",
    "x",
    "myproject",
    "filename",
    "apy",
    "b",
];

fn id(tok: &Tokenizer, t: &str) -> u32 {
    tok.token_to_id(t).unwrap_or_else(|| panic!("{t} in vocab"))
}

fn input() -> FimInput {
    FimInput {
        prefix: "def f".into(),
        suffix: "return x".into(),
        prompt: String::new(),
        extra: Vec::new(),
    }
}

#[test]
fn every_template_assembles_its_exact_sequence() {
    let cases: [(FimStyle, &[&str]); 5] = [
        (
            FimStyle::StarCoder,
            &["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>"],
        ),
        (
            FimStyle::Qwen,
            &[
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<|fim_pad|>",
            ],
        ),
        (
            FimStyle::CodeLlama,
            &["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"],
        ),
        (
            FimStyle::DeepSeek,
            &["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
        ),
        (FimStyle::Codestral, &["[PREFIX]", "[SUFFIX]"]),
    ];
    for (style, specials) in cases {
        let dir = tempfile::tempdir().expect("tmp");
        let tok = tokenizer(dir.path(), &WORDS, specials);
        let template = FimTemplate::detect(&tok).expect("detected");
        assert_eq!(template.style, style);
        let built = fim::build(&tok, &FimMode::Native(template.clone()), &input()).expect("build");
        let (def, f, ret, x) = (
            id(&tok, "def"),
            id(&tok, "f"),
            id(&tok, "return"),
            id(&tok, "x"),
        );
        let s = |i: usize| id(&tok, specials[i]);
        let want = match style {
            // Suffix first, no middle token.
            FimStyle::Codestral => vec![s(1), ret, x, s(0), def, f],
            // Prefix, suffix, middle (PSM).
            _ => vec![s(0), def, f, s(1), ret, x, s(2)],
        };
        assert_eq!(built.ids, want, "{style:?}");
        assert_eq!(built.mode, "fim");
        if specials.len() > 3 {
            assert!(
                built.stop_ids.contains(&s(3)),
                "{style:?} ends on its end token"
            );
        }
    }
}

#[test]
fn repo_level_context_uses_the_repo_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let specials = [
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ];
    let tok = tokenizer(dir.path(), &WORDS, &specials);
    let template = FimTemplate::detect(&tok).expect("qwen");
    let mut inp = input();
    inp.extra = vec![ExtraFile {
        filename: "apy".into(),
        text: "b".into(),
    }];
    inp.prompt = " x".into();
    let built = fim::build(&tok, &FimMode::Native(template), &inp).expect("build");
    let s = |i: usize| id(&tok, specials[i]);
    let w = |t: &str| id(&tok, t);
    assert_eq!(
        built.ids,
        vec![
            s(3),
            w("myproject"),
            s(4),
            w("apy"),
            w("b"),
            s(4),
            w("filename"),
            s(0),
            w("def"),
            w("f"),
            w("x"), // the typed `prompt` follows the prefix
            s(1),
            w("return"),
            w("x"),
            s(2),
        ]
    );
}

#[test]
fn a_vocabulary_without_fim_tokens_falls_back_to_prefix_completion() {
    let dir = tempfile::tempdir().expect("tmp");
    let tok = tokenizer(dir.path(), &WORDS, &[]);
    assert!(FimTemplate::detect(&tok).is_none());
    let err = FimTemplate::named("qwen", &tok).expect_err("no qwen tokens");
    assert!(err.contains("no `qwen`"), "{err}");
    let err = FimTemplate::named("nope", &tok).expect_err("unknown");
    assert!(
        err.contains("starcoder") && err.contains("codestral"),
        "{err}"
    );
    let mut inp = input();
    inp.suffix = "\n  return x\n".into();
    inp.extra = vec![ExtraFile {
        filename: "apy".into(),
        text: "b".into(),
    }];
    let built = fim::build(&tok, &FimMode::PrefixOnly, &inp).expect("build");
    assert_eq!(built.mode, "prefix");
    // Extra file text first (`// apy` → `apy` is the only vocabulary word of the header).
    let want: Vec<u32> = ["apy", "b", "def", "f"]
        .iter()
        .map(|w| id(&tok, w))
        .collect();
    let got: Vec<u32> = built.ids.iter().copied().filter(|&i| i != 0).collect();
    assert_eq!(got, want);
    assert_eq!(built.stop_strings, vec!["return x".to_string()]);
}
