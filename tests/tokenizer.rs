//! Tokenizer against `tests/reference/tokenizer.json` (transformers with the upstream SmolLM2
//! pre-tokenizer; identical to llama.cpp), from the GGUF metadata and from the
//! `tokenizer.json` that `convert` writes.

mod common;

use std::sync::Arc;

use common::*;
use nextoken::text::{Detokenizer, Tokenizer};

fn check_cases(tokenizer: &Tokenizer, label: &str) {
    let reference = reference("tokenizer.json");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() > 5);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = u32s(&case["ids"]);
        let ids = tokenizer.encode(text, true).expect("encode");
        assert_eq!(ids, want, "{label}: ids of {text:?}");
        let decoded = tokenizer.decode(&ids, false).expect("decode");
        assert_eq!(
            decoded,
            case["decoded"].as_str().expect("decoded"),
            "{label}: decode of {text:?}"
        );
        let pieces = case["per_token_decoded"].as_array().expect("pieces");
        // One reference case lists pieces of a different segmentation (12 pieces for 10 ids);
        // per-token decode is only comparable where the counts agree.
        if pieces.len() != ids.len() {
            continue;
        }
        for (id, piece) in ids.iter().zip(pieces) {
            let one = tokenizer.decode(&[*id], false).expect("decode");
            assert_eq!(
                one,
                piece.as_str().expect("piece"),
                "{label}: token {id} of {text:?}"
            );
        }
    }
}

#[test]
fn gguf_tokenizer_matches_reference() {
    check_cases(&gguf().1, "gguf");
}

#[test]
fn converted_tokenizer_json_matches_reference() {
    let tokenizer = Tokenizer::from_hf_dir(converted_dir()).expect("load converted tokenizer");
    check_cases(&tokenizer, "converted");
}

#[test]
fn tokenizer_written_to_gguf_by_convert_matches_reference() {
    let (_, tokenizer) = nextoken::load(gguf_from_folder()).expect("GGUF from folder loads");
    check_cases(&tokenizer, "folder → GGUF");
    let original = &gguf().1;
    assert_eq!(tokenizer.eos_id(), original.eos_id());
    assert_eq!(tokenizer.bos_id(), original.bos_id());
    assert_eq!(tokenizer.chat_template(), original.chat_template());
}

#[test]
fn special_tokens_and_bos_policy() {
    let tokenizer = &gguf().1;
    let reference = reference("tokenizer.json");
    let facts = &reference["facts"];
    assert_eq!(
        tokenizer.bos_id(),
        Some(facts["bos_token"][1].as_u64().expect("id") as u32)
    );
    assert_eq!(
        tokenizer.eos_id(),
        Some(facts["eos_token"][1].as_u64().expect("id") as u32)
    );
    assert!(!tokenizer.add_bos(), "SmolLM2 adds no BOS");
    let ids = tokenizer
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert!(ids.contains(&2));
    assert!(tokenizer.is_special(1) && !tokenizer.is_special(504));
    let template = tokenizer.chat_template().expect("GGUF has a chat template");
    assert!(template.contains("<|im_start|>"));
}

#[test]
fn streaming_detokenizer_is_utf8_exact() {
    let tokenizer = Arc::new(nextoken::load(&model_path()).expect("load").1);
    let reference = reference("tokenizer.json");
    let mut checked_partial = false;
    for case in reference["cases"].as_array().expect("cases") {
        let ids = u32s(&case["ids"]);
        let full = case["decoded"].as_str().expect("decoded");
        let mut d = Detokenizer::new(tokenizer.clone(), false);
        let mut out = String::new();
        for (id, piece) in ids
            .iter()
            .zip(case["per_token_decoded"].as_array().expect("p"))
        {
            let emitted = d.step(*id).expect("step");
            if piece.as_str().is_some_and(|p| p.contains('\u{FFFD}')) && !full.contains('\u{FFFD}')
            {
                checked_partial = true;
            }
            if let Some(text) = emitted {
                assert!(
                    !text.contains('\u{FFFD}') || full.contains('\u{FFFD}'),
                    "{text:?}"
                );
                out.push_str(&text);
            }
        }
        if let Some(rest) = d.flush().expect("flush") {
            out.push_str(&rest);
        }
        assert_eq!(out, full);
    }
    assert!(
        checked_partial,
        "the reference has tokens holding partial characters"
    );
}

/// Constrained decoding sees no text in special tokens — except a tool-call tag that a
/// vocabulary holds as one special token (Mistral's `[TOOL_CALLS]`, which its models write to
/// begin their calls): that one is its text, so a held call can begin with it.
#[test]
fn a_tool_tag_special_token_is_its_text_for_constrained_calls() {
    let dir = tempfile::tempdir().expect("tmp");
    let tok = word_tokenizer(
        dir.path(),
        &["get_weather"],
        &["[TOOL_CALLS]", "</s>", "[INST]"],
    );
    let bytes = tok.token_bytes();
    let id = |t: &str| tok.token_to_id(t).expect("in vocab") as usize;
    assert!(tok.is_special(id("[TOOL_CALLS]") as u32));
    assert_eq!(
        bytes[id("[TOOL_CALLS]")].as_deref(),
        Some(&b"[TOOL_CALLS]"[..])
    );
    assert_eq!(bytes[id("</s>")], None);
    assert_eq!(bytes[id("[INST]")], None);
}

/// A byte-level BPE vocabulary in GGUF metadata: `tokens` (GPT-2's byte characters: `Ġ` is a
/// space), `merges`, `pre` (`tokenizer.ggml.pre`).
fn gguf_bpe(tokens: &[&str], merges: &[&str], pre: &str) -> Tokenizer {
    let md = serde_json::json!({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
    });
    Tokenizer::from_gguf_metadata(md.as_object().expect("map")).expect("tokenizer")
}

/// GGUF byte-level vocabularies split text before their merges as llama.cpp splits each
/// `tokenizer.ggml.pre`: Tekken (Mistral Nemo, Small 3.x) at case changes and digit by digit,
/// a piece that is a token taken whole (llama.cpp's `ignore_merges`, as for Llama 3);
/// `gpt-4o` (Phi-4-mini, Llama 4) up to three digits together, merges always; DeepSeek-Coder
/// digit by digit. An unknown name is refused, never guessed.
#[test]
fn gguf_pre_tokenizers_split_as_llama_cpp_does() {
    let tokens = [
        "H", "e", "l", "o", "W", "r", "d", "a", "b", "c", "x", "1", "2", "3", "Ġ", "oW", "12",
        "ab", "abc",
    ];
    let merges = ["o W", "1 2", "a b"];
    let pieces = |pre: &str, text: &str| -> Vec<String> {
        let tok = gguf_bpe(&tokens, &merges, pre);
        let ids = tok.encode(text, false).expect("encode");
        ids.iter()
            .map(|&id| tok.id_to_token(id).expect("token"))
            .collect()
    };
    let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    // Case changes split words in Tekken, not in Llama 3's regex.
    assert_eq!(
        pieces("tekken", "HelloWorld"),
        s(&["H", "e", "l", "l", "o", "W", "o", "r", "l", "d"])
    );
    assert_eq!(
        pieces("llama3", "HelloWorld"),
        s(&["H", "e", "l", "l", "oW", "o", "r", "l", "d"])
    );
    // Digits: one by one in Tekken and DeepSeek-Coder, up to three together in gpt-4o and
    // Llama 3.
    assert_eq!(pieces("tekken", "x123"), s(&["x", "1", "2", "3"]));
    assert_eq!(pieces("deepseek-coder", "x123"), s(&["x", "1", "2", "3"]));
    assert_eq!(pieces("gpt-4o", "x123"), s(&["x", "12", "3"]));
    assert_eq!(pieces("llama3", "x123"), s(&["x", "12", "3"]));
    // A piece in the vocabulary is one token in Tekken and Llama 3 (whatever the merges
    // reach: here only `ab`); gpt-4o and Qwen2 merge.
    assert_eq!(pieces("tekken", "abc"), s(&["abc"]));
    assert_eq!(pieces("llama-bpe", "abc"), s(&["abc"]));
    assert_eq!(pieces("gpt-4o", "abc"), s(&["ab", "c"]));
    assert_eq!(pieces("qwen2", "abc"), s(&["ab", "c"]));
    let md = serde_json::json!({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges});
    let err = Tokenizer::from_gguf_metadata(md.as_object().expect("map"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("'nope'"), "{err}");
}
