//! The engine on the real model: continuous batching gives exactly the tokens of each request
//! run alone (greedy and seeded), cancellation and preemption free every KV block, chunked
//! prefill changes nothing, and impossible requests are refused at submit.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::engine::{engine, run};
use common::*;
use nextoken::engine::{
    EngineConfig, EngineError, EngineHandle, Event, FinishReason, GenerateRequest, SamplingParams,
};

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
    "My favourite recipe for pancakes needs",
    "In 1969, the first humans",
    "The quick brown fox",
    "SELECT name, age FROM users WHERE",
    "Photosynthesis is the process by which",
    "Dear hiring manager,\n\nI am writing to",
    "The best way to learn a new language is",
    "fn main() {\n    let v = vec![1, 2, 3];\n",
    "Water boils at 100 degrees Celsius, which is",
    "Here is a list of the planets in the solar system:\n1.",
];

fn prompts() -> Vec<Vec<u32>> {
    let tokenizer = &gguf().1;
    PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true).expect("encode"))
        .collect()
}

/// Waits until the engine has nothing running or waiting, then returns its stats.
fn wait_idle(engine: &EngineHandle) -> nextoken::engine::EngineStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = engine.stats();
        if s.num_running == 0 && s.num_waiting == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "engine never went idle: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes of one 16-token KV block of the default model.
fn block_bytes() -> usize {
    let model = &gguf().0;
    let c = model.config();
    nextoken::model::KvCache::bytes_per_token(c.num_layers, c.kv_dim(), model.kv_dtype()) * 16
}

/// Submits all the requests at once, then collects each one's tokens.
/// Each request's tokens run alone on an engine with the default (roomy) KV pool.
fn unconstrained_tokens(requests: &[GenerateRequest]) -> Vec<Vec<u32>> {
    let roomy = engine(EngineConfig::default());
    requests
        .iter()
        .map(|r| run(&roomy, r.clone()).tokens)
        .collect()
}

fn run_together(engine: &EngineHandle, requests: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let generations: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).expect("submit"))
        .collect();
    generations
        .into_iter()
        .map(|g| g.blocking_collect(|_| {}).expect("completes").tokens)
        .collect()
}

/// Waits until the engine is idle with `tokens` generated in all: the stats are published after
/// each step, so right after a request ends they may still be the previous step's.
fn wait_for_tokens(engine: &EngineHandle, tokens: usize) -> nextoken::engine::EngineStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = wait_idle(engine);
        if s.generation_tokens_total >= tokens as u64 {
            assert_eq!(s.generation_tokens_total, tokens as u64);
            return s;
        }
        assert!(Instant::now() < deadline, "tokens never counted: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Submits the requests one after another, each once the previous one has produced two
/// tokens, so every request joins a batch that is already running; collects all outputs.
fn run_staggered(engine: &EngineHandle, requests: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let mut handles = Vec::new();
    for request in requests {
        let mut generation = engine.submit(request).expect("submit");
        let (started_tx, started_rx) = mpsc::channel();
        handles.push(std::thread::spawn(move || {
            let mut tokens = Vec::new();
            while let Some(ev) = generation.blocking_next() {
                match ev {
                    Event::Token { id, .. } => {
                        tokens.push(id);
                        if tokens.len() == 2 {
                            let _ = started_tx.send(());
                        }
                    }
                    Event::PromptLogprobs(_) | Event::Embedding(_) => panic!("not asked for"),
                    Event::Finished { .. } => break,
                    Event::Failed(e) => panic!("failed: {e}"),
                }
            }
            let _ = started_tx.send(());
            tokens
        }));
        started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("request started");
    }
    handles
        .into_iter()
        .map(|h| h.join().expect("collector"))
        .collect()
}

#[test]
fn staggered_batch_gives_the_same_greedy_tokens_as_alone() {
    let engine = engine(EngineConfig::default());
    let requests: Vec<GenerateRequest> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest::greedy(p, 6 + (i * 5) % 17))
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| run(&engine, r.clone()).tokens)
        .collect();
    let batched = run_staggered(&engine, requests);
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "prompt {i}: {:?}", PROMPTS[i]);
    }
    let stats = wait_idle(&engine);
    assert_eq!(stats.kv_blocks_used, 0);
    assert!(stats.generation_tokens_total >= 2 * alone.iter().map(Vec::len).sum::<usize>() as u64);
}

#[test]
fn seeded_sampling_is_the_same_alone_and_in_a_batch_of_8() {
    let engine = engine(EngineConfig::default());
    let requests: Vec<GenerateRequest> = prompts()
        .into_iter()
        .take(8)
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            sampling: SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: 40,
                seed: Some(1000 + i as u64),
                ..Default::default()
            },
            ..GenerateRequest::greedy(p, 12)
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| run(&engine, r.clone()).tokens)
        .collect();
    let together = run_together(&engine, requests);
    assert_eq!(alone, together);
    let distinct: std::collections::HashSet<_> = together.iter().collect();
    assert!(
        distinct.len() > 4,
        "different seeds and prompts give different outputs"
    );
}

#[test]
fn cancelling_half_the_requests_frees_everything() {
    let engine = engine(EngineConfig::default());
    let prompts = prompts();
    let request = |i: usize| GenerateRequest::greedy(prompts[i].clone(), 24);
    let alone: Vec<Vec<u32>> = (0..10)
        .step_by(2)
        .map(|i| run(&engine, request(i)).tokens)
        .collect();
    let mut generations: Vec<_> = (0..10)
        .map(|i| engine.submit(request(i)).expect("submit"))
        .collect();
    // Everyone gets going, then every other request is dropped mid-flight.
    let mut firsts = Vec::new();
    for g in generations.iter_mut() {
        match g.blocking_next() {
            Some(Event::Token { id, .. }) => firsts.push(id),
            other => panic!("expected a token, got {other:?}"),
        }
    }
    let kept: Vec<_> = generations.into_iter().step_by(2).collect();
    for (k, g) in kept.into_iter().enumerate() {
        let out = g.blocking_collect(|_| {}).expect("completes");
        let mut tokens = vec![firsts[2 * k]];
        tokens.extend(out.tokens);
        assert_eq!(tokens, alone[k], "kept request {k}");
        assert_eq!(out.finish, FinishReason::Length);
        assert_eq!(out.usage.completion_tokens, 24);
    }
    let stats = wait_idle(&engine);
    assert_eq!(stats.kv_blocks_used, 0, "{stats:?}");
    assert_eq!(stats.num_cancelled, 5, "{stats:?}");
}

#[test]
fn tiny_kv_pool_preempts_and_still_gives_the_same_tokens() {
    let bytes_per_block = block_bytes();
    let requests: Vec<GenerateRequest> = prompts()
        .into_iter()
        .take(8)
        .map(|p| GenerateRequest::greedy(p, 24))
        .collect();
    let want = unconstrained_tokens(&requests);
    // Each request needs 2–3 blocks; 6 blocks cannot hold 8 of them at once.
    let tight = engine(EngineConfig {
        kv_cache_bytes: 6 * bytes_per_block,
        ..Default::default()
    });
    let got = run_together(&tight, requests);
    assert_eq!(got, want);
    let stats = wait_idle(&tight);
    assert!(stats.num_preempted > 0, "the pool was too small: {stats:?}");
    assert_eq!(stats.kv_blocks_used, 0);
}

#[test]
fn chunked_prefill_of_a_1000_token_prompt_matches_one_pass() {
    let tokenizer = &gguf().1;
    let text = "The old lighthouse keeper wrote in his log every evening. ".repeat(120);
    let mut prompt = tokenizer.encode(&text, true).expect("encode");
    prompt.truncate(1000);
    assert_eq!(prompt.len(), 1000);
    let one_pass = engine(EngineConfig {
        max_batch_tokens: 1024,
        ..Default::default()
    });
    let a = run(&one_pass, GenerateRequest::greedy(prompt.clone(), 8));
    drop(one_pass);
    let chunked = engine(EngineConfig {
        max_batch_tokens: 96,
        ..Default::default()
    });
    let b = run(&chunked, GenerateRequest::greedy(prompt, 8));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(b.usage.prompt_tokens, 1000);
}

#[test]
fn impossible_requests_are_refused_at_submit() {
    let small = engine(EngineConfig {
        kv_cache_bytes: 4 << 20,
        ..Default::default()
    });
    let context = small.limits().context_length;
    let err = |r: GenerateRequest| small.submit(r).err().expect("refused");
    let e = err(GenerateRequest::greedy(vec![1; 10], context));
    assert!(
        matches!(&e, EngineError::Invalid(m) if m.contains("context length")),
        "{e}"
    );
    let e = err(GenerateRequest::greedy(vec![1; 10], 500));
    assert!(
        matches!(&e, EngineError::Invalid(m) if m.contains("KV cache")),
        "{e}"
    );
    let e = err(GenerateRequest::greedy(vec![], 5));
    assert!(
        matches!(&e, EngineError::Invalid(m) if m.contains("empty")),
        "{e}"
    );
    let e = err(GenerateRequest::greedy(vec![49152], 5));
    assert!(
        matches!(&e, EngineError::Invalid(m) if m.contains("vocabulary")),
        "{e}"
    );
    let e = err(GenerateRequest {
        top_logprobs: Some(21),
        ..GenerateRequest::greedy(vec![1], 5)
    });
    assert!(matches!(e, EngineError::Invalid(_)));
    // A request that fits still runs on the same engine.
    let ok = run(
        &small,
        GenerateRequest::greedy(vec![504, 3575, 282, 4649, 314], 3),
    );
    assert_eq!(ok.tokens[0], 7042);
}

/// A prompt that spans many KV blocks.
fn long_prompt(extra: &str) -> Vec<u32> {
    let text = PROMPTS.join(" ") + extra;
    gguf().1.encode(&text, true).expect("encode")
}

#[test]
fn prefix_cache_reuses_full_blocks_and_changes_no_token() {
    let engine = engine(EngineConfig::default());
    let prompt = long_prompt("");
    let len = prompt.len();
    let cached = (len - 1) / 16 * 16;
    assert!(
        cached >= 64,
        "the prompt spans several blocks ({len} tokens)"
    );

    let s0 = wait_idle(&engine);
    let first = run(&engine, GenerateRequest::greedy(prompt.clone(), 12));
    assert_eq!(first.usage.cached_tokens, 0);
    let s1 = wait_idle(&engine);
    assert_eq!(s1.prompt_tokens_total - s0.prompt_tokens_total, len as u64);

    let again = run(&engine, GenerateRequest::greedy(prompt.clone(), 12));
    assert_eq!(
        again.tokens, first.tokens,
        "cached KV gives the same tokens"
    );
    assert_eq!(again.usage.cached_tokens, cached);
    let s2 = wait_idle(&engine);
    assert_eq!(
        s2.prompt_tokens_total - s1.prompt_tokens_total,
        (len - cached) as u64,
        "only the uncached tail is computed"
    );
    assert_eq!(
        s2.prefix_cache_hits_total - s1.prefix_cache_hits_total,
        cached as u64
    );

    // A longer prompt sharing the head: same tokens as on an engine that never saw it.
    let longer = long_prompt(" And finally, the answer is");
    let warm = run(&engine, GenerateRequest::greedy(longer.clone(), 12));
    assert!(warm.usage.cached_tokens >= cached - 16);
    let fresh_engine = common::engine::engine(EngineConfig::default());
    let cold = run(&fresh_engine, GenerateRequest::greedy(longer, 12));
    assert_eq!(cold.usage.cached_tokens, 0);
    assert_eq!(warm.tokens, cold.tokens);

    assert_eq!(wait_idle(&engine).kv_blocks_used, 0);
}

#[test]
fn identical_concurrent_prompts_compute_the_shared_prefix_once() {
    let engine = engine(EngineConfig::default());
    let prompt = long_prompt(" Four answers:");
    let len = prompt.len();
    let cached = (len - 1) / 16 * 16;
    let s0 = wait_idle(&engine);
    // Submitted together, as the server does for `n > 1`.
    let generations: Vec<_> = (0..4)
        .map(|_| {
            engine
                .submit(GenerateRequest::greedy(prompt.clone(), 10))
                .expect("submit")
        })
        .collect();
    let outs: Vec<_> = generations
        .into_iter()
        .map(|g| g.blocking_collect(|_| {}).expect("completes"))
        .collect();
    for o in &outs[1..] {
        assert_eq!(o.tokens, outs[0].tokens);
    }
    let total_cached: usize = outs.iter().map(|o| o.usage.cached_tokens).sum();
    assert_eq!(
        total_cached,
        3 * cached,
        "three of four reuse the first one's blocks"
    );
    let s1 = wait_idle(&engine);
    assert_eq!(
        s1.prompt_tokens_total - s0.prompt_tokens_total,
        (len + 3 * (len - cached)) as u64
    );
    assert_eq!(s1.kv_blocks_used, 0);
}

/// `prompt` + `continuation` asking for the prompt's log-probabilities and nothing generated.
fn scoring(prompt: &[u32], top: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_logprobs: Some(top),
        ..GenerateRequest::greedy(prompt.to_vec(), 0)
    }
}

#[test]
fn prompt_logprobs_equal_the_decoding_path_chunked_or_not_cached_or_not() {
    let engine = engine(EngineConfig::default());
    let prompt = long_prompt(" In short:");
    let p = prompt.len();
    // The tokens greedy decoding picks, with their log-probabilities as decoding reports them.
    let decoded = run(
        &engine,
        GenerateRequest {
            top_logprobs: Some(5),
            ..GenerateRequest::greedy(prompt.clone(), 10)
        },
    );
    assert_eq!(decoded.tokens.len(), 10);
    assert!(
        decoded.prompt_logprobs.is_empty(),
        "not asked for, not computed"
    );
    let mut text = prompt.clone();
    text.extend(&decoded.tokens);

    // Scoring the same text: every position after the first, each the log-probability of the
    // token there given the ones before; the decoded tokens' are bit for bit decoding's,
    // although their prompt blocks are cached by now (scoring computes every row again).
    let scored = run(&engine, scoring(&text, 5));
    assert_eq!(scored.tokens, Vec::<u32>::new());
    assert_eq!(scored.finish, FinishReason::Length);
    assert_eq!(scored.usage.completion_tokens, 0);
    assert_eq!(scored.usage.cached_tokens, 0);
    assert_eq!(scored.prompt_logprobs.len(), text.len() - 1);
    for (i, lp) in decoded.logprobs.iter().enumerate() {
        let lp = lp.as_ref().expect("asked for");
        assert_eq!(&scored.prompt_logprobs[p - 1 + i], lp, "decoded token {i}");
    }
    for (k, lp) in scored.prompt_logprobs.iter().enumerate() {
        assert_eq!(lp.top.len(), 5);
        assert!(lp.logprob <= 0.0 && lp.logprob >= lp.top[4].1 - 50.0);
        // The greedy continuation is each step's top token.
        if k + 1 >= p {
            assert_eq!(lp.top[0], (text[k + 1], lp.logprob), "position {}", k + 1);
        }
    }

    // Chunked prefill (and the decoding request beside it) changes none of them.
    let chunked = common::engine::engine(EngineConfig {
        max_batch_tokens: 37,
        ..Default::default()
    });
    let other = chunked
        .submit(GenerateRequest::greedy(prompts()[2].clone(), 40))
        .expect("submit");
    let again = run(&chunked, scoring(&text, 5));
    assert_eq!(again.prompt_logprobs, scored.prompt_logprobs);
    assert_eq!(
        other.blocking_collect(|_| {}).expect("done").tokens.len(),
        40
    );

    // Scoring left its prompt in the prefix cache: a later request reuses it (how clients warm
    // the cache with `max_tokens: 0`).
    let warm = run(&chunked, GenerateRequest::greedy(text.clone(), 3));
    assert_eq!(warm.usage.cached_tokens, (text.len() - 1) / 16 * 16);
    assert_eq!(wait_idle(&chunked).kv_blocks_used, 0);
    let e = chunked
        .submit(scoring(&text, 21))
        .err()
        .expect("21 alternatives refused");
    assert!(matches!(e, EngineError::Invalid(_)), "{e}");
}

/// Prompts whose continuations copy their context, so that prompt-lookup drafts get confirmed.
const COPYING_PROMPTS: [&str; 4] = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,",
    "<|im_start|>user\nRepeat this sentence exactly: The quick brown fox jumps over the lazy dog \
     near the old river bank.<|im_end|>\n<|im_start|>assistant\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\
     class Point3D:\n    def __init__(self, x, y, z):\n",
];

#[test]
fn speculative_decoding_gives_exactly_the_tokens_of_plain_decoding() {
    let plain = engine(EngineConfig::default());
    let spec = engine(EngineConfig {
        speculative_tokens: 4,
        ..Default::default()
    });
    let tokenizer = &gguf().1;
    let copying: Vec<Vec<u32>> = COPYING_PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true).expect("encode"))
        .collect();
    let mut requests = Vec::new();
    for (i, p) in copying.iter().chain(prompts().iter().take(3)).enumerate() {
        requests.push(GenerateRequest::greedy(p.clone(), 40));
        // Seeded sampling with penalties (they see the step's earlier tokens) and logprobs.
        requests.push(GenerateRequest {
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.95,
                top_k: 40,
                repetition_penalty: 1.05,
                frequency_penalty: 0.1,
                seed: Some(7 + i as u64),
                ..Default::default()
            },
            top_logprobs: Some(3),
            ..GenerateRequest::greedy(p.clone(), 40)
        });
    }
    // Penalties strong enough to change greedy choices: they must count the step's earlier
    // (confirmed) tokens.
    for p in &copying {
        requests.push(GenerateRequest {
            sampling: SamplingParams {
                frequency_penalty: 0.8,
                ..SamplingParams::greedy()
            },
            ..GenerateRequest::greedy(p.clone(), 40)
        });
    }
    // Short budgets end inside a step's confirmed drafts.
    for max in [1, 2, 3, 7] {
        requests.push(GenerateRequest::greedy(copying[1].clone(), max));
    }
    let reference: Vec<_> = requests.iter().map(|r| run(&plain, r.clone())).collect();
    // A stop token met inside a run of confirmed drafts ends the request there.
    let counting = &reference[2].tokens;
    let stop = counting[counting.len() / 2];
    let stopping = GenerateRequest {
        stop_token_ids: vec![stop],
        ..GenerateRequest::greedy(copying[1].clone(), 40)
    };
    let stopped = run(&plain, stopping.clone());
    assert_eq!(stopped.finish, FinishReason::StopToken(stop));
    requests.push(stopping);
    let mut expected = reference;
    expected.push(stopped);
    let total: usize = expected.iter().map(|c| c.usage.completion_tokens).sum();
    let plain_stats = wait_for_tokens(&plain, total);

    for (i, (request, want)) in requests.iter().zip(&expected).enumerate() {
        let got = run(&spec, request.clone());
        assert_eq!(got.tokens, want.tokens, "request {i}");
        assert_eq!(got.logprobs, want.logprobs, "request {i}");
        assert_eq!(got.finish, want.finish, "request {i}");
        assert_eq!(got.usage, want.usage, "request {i}");
    }
    let stats = wait_for_tokens(&spec, total);
    // Drafts were computed and confirmed: the same tokens took fewer steps.
    assert!(
        stats.spec_accepted_tokens_total >= 50,
        "confirmed drafts: {stats:?}"
    );
    assert!(stats.spec_draft_tokens_total > stats.spec_accepted_tokens_total);
    assert_eq!(
        stats.num_steps + stats.spec_accepted_tokens_total,
        plain_stats.num_steps,
        "each confirmed draft saves one step"
    );
    assert_eq!(stats.kv_blocks_used, 0);
    assert_eq!(plain_stats.spec_draft_tokens_total, 0);

    // Several sequences speculating in one batch: each gets its tokens of running alone.
    let greedy: Vec<GenerateRequest> = requests[..2 * COPYING_PROMPTS.len()]
        .iter()
        .step_by(2)
        .cloned()
        .collect();
    for (k, got) in run_together(&spec, greedy).into_iter().enumerate() {
        assert_eq!(got, expected[2 * k].tokens, "prompt {k} in a batch");
    }
    assert_eq!(wait_idle(&spec).kv_blocks_used, 0);
}

/// Speculating sequences in a pool too small for them: drafts are dropped before anyone is
/// preempted for them, preempted sequences come back, and every request still gets the tokens
/// of plain decoding; no block leaks.
#[test]
fn speculation_in_a_tiny_kv_pool_changes_no_token() {
    let bytes_per_block = block_bytes();
    let tokenizer = &gguf().1;
    let requests: Vec<GenerateRequest> = COPYING_PROMPTS
        .iter()
        .map(|p| GenerateRequest::greedy(tokenizer.encode(p, true).expect("encode"), 40))
        .collect();
    let want = unconstrained_tokens(&requests);
    // The four need 4–7 blocks each at the end; 12 cannot hold them at once.
    let tight = engine(EngineConfig {
        kv_cache_bytes: 12 * bytes_per_block,
        speculative_tokens: 4,
        ..Default::default()
    });
    let got = run_together(&tight, requests);
    assert_eq!(got, want);
    let stats = wait_idle(&tight);
    assert!(stats.num_preempted > 0, "the pool was too small: {stats:?}");
    assert!(stats.spec_accepted_tokens_total > 0, "{stats:?}");
    assert_eq!(stats.kv_blocks_used, 0);
}

/// Two less urgent requests fill the running set; a more urgent one that arrives while they
/// decode takes the place of the newer of them at once and finishes first; the one it
/// displaced is recomputed. Every request still gets exactly its tokens alone.
#[test]
fn an_urgent_request_overtakes_and_no_token_changes() {
    let engine = engine(EngineConfig {
        max_running_seqs: 2,
        ..EngineConfig::default()
    });
    let all = prompts();
    let request = |i: usize, n: usize, priority: i32| GenerateRequest {
        priority,
        stop_token_ids: vec![],
        ..GenerateRequest::greedy(all[i].clone(), n)
    };
    let requests = [request(0, 48, 1), request(1, 48, 1), request(2, 8, 0)];
    let alone = unconstrained_tokens(&requests);
    let (done_tx, done_rx) = mpsc::channel();
    let mut handles = Vec::new();
    let mut started = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        if i == 2 {
            // The two slow ones are running: the urgent one has to displace one of them.
            for rx in &started {
                let rx: &mpsc::Receiver<()> = rx;
                rx.recv_timeout(Duration::from_secs(60)).expect("started");
            }
            // The stats are published after each step: they may still be the last one's.
            let deadline = Instant::now() + Duration::from_secs(10);
            while engine.stats().num_running != 2 {
                assert!(Instant::now() < deadline, "{:?}", engine.stats());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut generation = engine.submit(r.clone()).expect("submit");
        let (started_tx, started_rx) = mpsc::channel();
        started.push(started_rx);
        let done = done_tx.clone();
        handles.push(std::thread::spawn(move || {
            let mut tokens = Vec::new();
            while let Some(ev) = generation.blocking_next() {
                match ev {
                    Event::Token { id, .. } => {
                        tokens.push(id);
                        let _ = started_tx.send(());
                    }
                    Event::Finished { .. } => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            let _ = done.send(i);
            tokens
        }));
    }
    let got: Vec<Vec<u32>> = handles
        .into_iter()
        .map(|h| h.join().expect("collector"))
        .collect();
    let order: Vec<usize> = done_rx.try_iter().collect();
    assert_eq!(
        order.first(),
        Some(&2),
        "the urgent request finishes first: {order:?}"
    );
    assert_eq!(got, alone);
    let stats = wait_idle(&engine);
    assert!(stats.num_preempted >= 1, "{stats:?}");
}
