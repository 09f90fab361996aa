//! `nextoken bench --url`: the load generator over HTTP against any OpenAI-compatible server
//! (nextoken's own, llama.cpp's `llama-server`, vLLM): C concurrent streaming
//! `/v1/completions` requests with token-id prompts and `ignore_eos`, so every server does the
//! same work. Plain HTTP/1.1 over `std::net` (one thread per request), no client library.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::bench::{merged, wave_summary, RequestTimes};

/// `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    host: String,
    port: u16,
    prefix: String,
}

impl HttpTarget {
    /// Parses a base URL (`http://` only).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().with_context(|| format!("{url}: bad port"))?),
            None => (authority, 80),
        };
        anyhow::ensure!(!host.is_empty(), "{url}: no host");
        Ok(HttpTarget {
            host: host.to_string(),
            port,
            prefix: prefix.to_string(),
        })
    }

    /// Sends one request (`Connection: close`) and returns the status and a reader over the
    /// decoded body.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        api_key: Option<&str>,
    ) -> anyhow::Result<(u16, Box<dyn BufRead + Send>)> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
        stream.set_nodelay(true)?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = api_key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\n\
             Accept: */*\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.prefix,
            self.host,
            self.port,
            body.len()
        )?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut chunked = false;
        let mut length = None;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<u64>().ok();
            }
        }
        let body: Box<dyn BufRead + Send> = if chunked {
            Box::new(BufReader::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            }))
        } else if let Some(n) = length {
            Box::new(BufReader::new(reader.take(n)))
        } else {
            Box::new(reader)
        };
        Ok((status, body))
    }

    fn get_json(&self, path: &str, api_key: Option<&str>) -> anyhow::Result<Value> {
        let (status, mut body) = self.send("GET", path, None, api_key)?;
        let mut text = String::new();
        body.read_to_string(&mut text)?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {text}");
        Ok(serde_json::from_str(&text)?)
    }
}

/// Decodes `Transfer-Encoding: chunked`.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line == "\r\n" {
                // The CRLF that ends the previous chunk.
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got;
        Ok(got)
    }
}

/// One streaming completion; times are measured from `wave_start`.
fn stream_completion(
    target: &HttpTarget,
    body: &Value,
    api_key: Option<&str>,
    wave_start: Instant,
) -> anyhow::Result<RequestTimes> {
    let (status, mut reader) = target.send("POST", "/v1/completions", Some(body), api_key)?;
    if status != 200 {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        bail!("POST /v1/completions: {status} {text}");
    }
    let mut out = RequestTimes {
        ttft: Duration::ZERO,
        gaps: Vec::new(),
        tokens: 0,
    };
    let (mut events, mut usage_tokens, mut last) = (0usize, None, Instant::now());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("event {data}"))?;
        if let Some(n) = v
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
        {
            usage_tokens = Some(n as usize);
        }
        let has_token = v["choices"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()))
        });
        if has_token {
            let now = Instant::now();
            if events == 0 {
                out.ttft = now - wave_start;
            } else {
                out.gaps.push(now - last);
            }
            last = now;
            events += 1;
        }
    }
    out.tokens = usage_tokens.unwrap_or(events);
    Ok(out)
}

/// Peak resident memory of process `pid` in MiB (`VmHWM`), where readable.
fn peak_rss_of(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// What `bench --url` measures.
#[derive(Debug, Clone)]
pub struct HttpBenchConfig {
    /// Concurrency levels, one JSON line each.
    pub concurrency: Vec<usize>,
    /// Prompt tokens per request (token ids, distinct per request).
    pub prompt_tokens: usize,
    /// New tokens per request (EOS ignored).
    pub new_tokens: usize,
    /// Bearer token, if the server wants one.
    pub api_key: Option<String>,
    /// The server's process id, to report its peak RSS.
    pub server_pid: Option<u32>,
    /// Picks the prompts: runs with different seeds share no prefix, so a server's prompt
    /// cache cannot carry one run into the next.
    pub prompt_seed: usize,
}

/// Runs the sweep against `url`, printing one JSON line per concurrency level (the engine
/// sweep's keys, plus `url`).
pub fn run(url: &str, config: &HttpBenchConfig) -> anyhow::Result<Vec<Value>> {
    let target = HttpTarget::parse(url)?;
    let key = config.api_key.as_deref();
    let models = target.get_json("/v1/models", key)?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("GET /v1/models lists no model")?
        .to_string();
    let mut lines = Vec::new();
    for &c in &config.concurrency {
        let wave_start = Instant::now();
        let handles: Vec<_> = (0..c)
            .map(|i| {
                let body = json!({
                    "model": model,
                    // Ids below 10,000 exist in any vocabulary worth benchmarking; distinct
                    // per request so no server can share a prefix.
                    "prompt": crate::bench::prompt(
                        1000 + config.prompt_seed * 100_000 + i,
                        config.prompt_tokens,
                        10_000,
                    ),
                    "max_tokens": config.new_tokens,
                    "temperature": 0.0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                let target = target.clone();
                let key = config.api_key.clone();
                std::thread::spawn(move || {
                    stream_completion(&target, &body, key.as_deref(), wave_start)
                })
            })
            .collect();
        let mut results = Vec::with_capacity(c);
        for h in handles {
            results.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
            );
        }
        let summary = wave_summary(&results, wave_start.elapsed().as_secs_f64());
        let line = merged(
            json!({
                "url": url,
                "concurrency": c,
                "prompt_tokens": config.prompt_tokens,
                "new_tokens": config.new_tokens,
                "peak_rss_mb": config.server_pid.and_then(peak_rss_of),
            }),
            summary,
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = HttpTarget::parse("http://127.0.0.1:8091/").expect("url");
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("127.0.0.1", 8091, "")
        );
        let t = HttpTarget::parse("http://example.org/api").expect("url");
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("example.org", 80, "/api")
        );
        assert!(HttpTarget::parse("https://example.org").is_err());
        assert!(HttpTarget::parse("http://:80").is_err());
    }

    #[test]
    fn chunked_bodies_decode() {
        let raw = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked {
            inner: &raw[..],
            left: 0,
            done: false,
        }
        .read_to_string(&mut out)
        .expect("decode");
        assert_eq!(out, "Wikipedia in \r\n\r\nchunks.");
    }
}
