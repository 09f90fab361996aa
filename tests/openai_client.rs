//! A real `nextoken serve` process on a free port, driven by the official `openai` Python
//! client and by a 64-client streaming load (httpx), plus graceful shutdown on SIGTERM. The
//! Python packages are installed into a venv under `target/` on first use.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "test-key";

/// A server process, killed on drop.
struct Server {
    child: Child,
    addr: String,
    _data: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server with a fresh data dir of its own.
fn start_server(extra: &[&str]) -> Server {
    let data = tempfile::tempdir().expect("tmp");
    let dir = data.path().to_str().expect("utf-8").to_string();
    let mut server = start_server_in(&dir, extra);
    server._data = Some(data);
    server
}

fn start_server_in(data_dir: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nextoken"))
        .args([
            "serve",
            "--model",
            model_path().to_str().expect("utf-8"),
            "--port",
            "0",
        ])
        .args(["--served-model-name", "smollm2", "--api-key", KEY])
        .args(["--data-dir", data_dir])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server printed its address")
            .expect("line");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let server = Server {
        child,
        addr,
        _data: None,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while http_get(&server.addr, "/health").0 != 200 {
        assert!(Instant::now() < deadline, "server never became healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// Minimal blocking HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path, None)
}

fn run_python(script: &str, server: &Server) -> String {
    let out = Command::new(python())
        .arg(repo().join("tests/python").join(script))
        .arg(format!("http://{}", server.addr))
        .arg(KEY)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    stdout.to_string()
}

#[test]
fn official_openai_client_and_a_64_client_load() {
    let server = start_server(&[]);
    run_python("openai_client_check.py", &server);
    run_python("ollama_client_check.py", &server);
    run_python("load_check.py", &server);
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits_zero() {
    let mut server = start_server(&["--shutdown-grace-secs", "60"]);
    let addr = server.addr.clone();
    let request = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/v1/completions",
            Some(
                r#"{"prompt":"Once upon a time","max_tokens":40,"ignore_eos":true,"temperature":0}"#,
            ),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = server.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let (code, body) = request.join().expect("request thread");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["usage"]["completion_tokens"], 40,
        "the running request finished"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(
        http_get(&server.addr, "/health").0,
        200,
        "no longer accepting"
    );
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

/// The official client drives a fine-tune end to end; then a long job is killed mid-run
/// (SIGKILL) and the restarted server reports it `failed`/`interrupted` while the earlier
/// adapter is listed and served again, and the files are still there.
#[test]
fn fine_tuning_with_the_openai_client_survives_a_kill() {
    let data = tempfile::tempdir().expect("tmp");
    let dir = data.path().to_str().expect("utf-8").to_string();
    let mut server = start_server_in(&dir, &[]);
    let out = run_python("fine_tuning_check.py", &server);
    let ft_model = out.lines().last().expect("model name").trim().to_string();
    let prompt = r#""prompt":"The river Dunmere flows into","max_tokens":8,"temperature":0"#;
    let (code, before) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        Some(&format!(r#"{{"model":"{ft_model}",{prompt}}}"#)),
    );
    assert_eq!(code, 200, "{before}");
    let before = json(&before)["choices"][0]["text"].clone();

    let (_, jobs) = http_get(&server.addr, "/v1/fine_tuning/jobs");
    let first_job = json(&jobs)["data"][0]["id"]
        .as_str()
        .expect("the succeeded job")
        .to_string();

    // A long job; kill the server once it has reported a step.
    let (_, files) = http_get(&server.addr, "/v1/files");
    let file_id = json(&files)["data"][0]["id"]
        .as_str()
        .expect("file")
        .to_string();
    let (code, job) = http(
        &server.addr,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(&format!(
            r#"{{"model":"smollm2","training_file":"{file_id}","hyperparameters":{{"n_epochs":50,"batch_size":1}}}}"#
        )),
    );
    assert_eq!(code, 200, "{job}");
    let job_id = json(&job)["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, events) = http_get(
            &server.addr,
            &format!("/v1/fine_tuning/jobs/{job_id}/events"),
        );
        if events.contains("\"metrics\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no training step reported: {events}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    drop(server);

    // Restart; also serve the first job's adapter files under a second name with --lora.
    let adapter_dir = format!("{dir}/adapters/{first_job}");
    let server = start_server_in(&dir, &["--lora", &format!("mine={adapter_dir}")]);
    let (_, job) = http_get(&server.addr, &format!("/v1/fine_tuning/jobs/{job_id}"));
    let job = json(&job);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "interrupted", "{job}");
    assert_eq!(job["fine_tuned_model"], serde_json::Value::Null);
    let (_, models) = http_get(&server.addr, "/v1/models");
    assert!(models.contains(&ft_model), "{models}");
    let (code, after) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        Some(&format!(r#"{{"model":"{ft_model}",{prompt}}}"#)),
    );
    assert_eq!(code, 200, "{after}");
    assert_eq!(
        json(&after)["choices"][0]["text"],
        before,
        "same adapter, same tokens"
    );
    assert!(models.contains("\"mine\""), "{models}");
    let (code, mine) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        Some(&format!(r#"{{"model":"mine",{prompt}}}"#)),
    );
    assert_eq!(code, 200, "{mine}");
    assert_eq!(
        json(&mine)["choices"][0]["text"],
        before,
        "--lora serves the same adapter"
    );
    let (_, files) = http_get(&server.addr, "/v1/files");
    assert!(files.contains(&file_id), "{files}");
    let (_, jobs) = http_get(&server.addr, "/v1/fine_tuning/jobs");
    assert_eq!(
        json(&jobs)["data"].as_array().map(Vec::len),
        Some(2),
        "{jobs}"
    );
}

/// Chromium for the browser test: `$CHROMIUM`, else `chromium` on the PATH (the test command
/// installs the Debian package in CI). Missing is a failure, not a skip.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            if out.status.success() {
                return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    panic!("no Chromium found: install the `chromium` package (apt-get install chromium) or set CHROMIUM");
}

/// playwright-core from npm, installed once under target/.
fn playwright_dir() -> PathBuf {
    let dir = repo().join("target/browser-node");
    if !dir.join("node_modules/playwright-core").exists() {
        std::fs::create_dir_all(&dir).expect("dir");
        let status = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("playwright-core@1")
            .status()
            .expect("npm (Node.js) is needed for the browser test");
        assert!(status.success(), "npm install playwright-core failed");
    }
    dir
}

#[test]
fn playground_in_headless_chromium() {
    let chromium = chromium();
    let node_dir = playwright_dir();
    let server = start_server(&[]);
    let shots = repo().join("target/test-output/playground");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    // The script imports playwright-core from node_modules next to it.
    let script = node_dir.join("playground.mjs");
    std::fs::copy(repo().join("tests/browser/playground.mjs"), &script).expect("copy script");
    let out = Command::new("node")
        .arg(&script)
        .arg(format!("http://{}", server.addr))
        .arg(KEY)
        .arg(&shots)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "playground check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("playground: ok"), "{stdout}");
    for shot in ["completion.png", "chat.png", "finetune.png"] {
        assert!(shots.join(shot).exists(), "screenshot {shot}");
    }
    // The page itself needs no key; the API behind it does.
    assert_eq!(http_get(&server.addr, "/").0, 200);
}

/// `nextoken bench --url` against a running server: streamed completions over HTTP, every
/// requested token counted, the server's peak RSS read from its pid.
#[test]
fn bench_url_mode_measures_a_running_server() {
    let server = start_server(&["--no-training"]);
    let out = Command::new(env!("CARGO_BIN_EXE_nextoken"))
        .args(["bench", "--url", &format!("http://{}", server.addr)])
        .args(["--api-key", KEY, "--concurrency", "1,3"])
        .args(["--prompt-tokens", "20", "--new-tokens", "6"])
        .args(["--server-pid", &server.child.id().to_string()])
        .output()
        .expect("run bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, c) in lines.iter().zip([1.0, 3.0]) {
        assert_eq!(line["concurrency"].as_f64(), Some(c));
        let tokens =
            line["agg_tok_s"].as_f64().expect("agg") * line["wall_s"].as_f64().expect("wall");
        assert_eq!(tokens.round(), 6.0 * c, "every token counted: {line}");
        assert!(line["ttft_ms_p50"].as_f64().expect("ttft") > 0.0);
        assert!(line["itl_ms_p50"].as_f64().expect("itl") > 0.0);
        assert!(line["peak_rss_mb"].as_f64().expect("rss") > 50.0, "{line}");
    }
}

/// The official client runs a batch; then a long batch is killed mid-run (SIGKILL) and the
/// restarted server finishes it: every request answered once, none run twice, in input order.
#[test]
fn batches_with_the_openai_client_survive_a_kill() {
    let data = tempfile::tempdir().expect("tmp");
    let dir = data.path().to_str().expect("utf-8").to_string();
    let mut server = start_server_in(&dir, &["--batch-concurrency", "2"]);
    run_python("batch_check.py", &server);
    let out = Command::new(python())
        .arg(repo().join("tests/python/batch_check.py"))
        .args([&format!("http://{}", server.addr), KEY, "start", "24"])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = format!("/v1/batches/{id}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        let batch = json(&http_get(&server.addr, &path).1);
        let done = batch["request_counts"]["completed"].as_u64().unwrap_or(0);
        if done >= 2 {
            break done;
        }
        assert!(Instant::now() < deadline, "no request answered: {batch}");
        std::thread::sleep(Duration::from_millis(50));
    };
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    drop(server);

    let server = start_server_in(&dir, &["--batch-concurrency", "2"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let batch = loop {
        let batch = json(&http_get(&server.addr, &path).1);
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(
            ["in_progress", "finalizing", "validating"]
                .contains(&batch["status"].as_str().unwrap_or("")),
            "{batch}"
        );
        assert!(Instant::now() < deadline, "batch never finished: {batch}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        before < 24,
        "the kill came before the end ({before} answered)"
    );
    assert_eq!(
        batch["request_counts"],
        serde_json::json!({"total": 24, "completed": 24, "failed": 0})
    );
    let file = batch["output_file_id"].as_str().expect("output file");
    let (code, text) = http_get(&server.addr, &format!("/v1/files/{file}/content"));
    assert_eq!(code, 200);
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            json(l)["custom_id"]
                .as_str()
                .expect("custom_id")
                .to_string()
        })
        .collect();
    let want: Vec<String> = (0..24).map(|i| format!("long-{i}")).collect();
    assert_eq!(ids, want);
    for line in text.lines() {
        let v = json(line);
        assert_eq!(
            v["response"]["body"]["usage"]["completion_tokens"], 64,
            "{line}"
        );
    }
}
