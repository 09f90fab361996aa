//! `Weights`: one view over a model's tensors by their Hugging Face names, whether they come
//! from safetensors (single file or sharded index) or from a GGUF file. GGUF names are mapped
//! onto HF names here, and llama.cpp's Q/K row permutation is undone, so architecture code is
//! written once. Tensors are returned as f32 (GGUF blocks are dequantized exactly, bf16/f16
//! widened); reading knows nothing of what the model does with them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::Architecture;
use super::linear::Linear;
use super::quant::{QMatrix, QuantFormat};
use super::LoadError;

/// Where the tensors live.
enum Source {
    /// Every tensor of every shard, loaded into memory.
    Safetensors(HashMap<String, Tensor>),
    /// An open GGUF file and its parsed header.
    Gguf {
        file: File,
        content: gguf_file::Content,
        /// Tensors of types candle's reader does not know (llama.cpp's IQ4_NL, IQ4_XS), by
        /// GGUF name: their `content` entry has a placeholder type, this map the real one.
        foreign: HashMap<String, QuantFormat>,
        /// Query and key/value head counts, to undo llama.cpp's Q/K permutation (llama only).
        heads: Option<(usize, usize)>,
        /// Architecture, for the names that differ between families.
        arch: Architecture,
    },
}

/// Tensors of one model, addressed by Hugging Face names.
pub struct Weights {
    path: PathBuf,
    source: Source,
}

/// Maps a Hugging Face tensor name onto its llama.cpp GGUF name.
pub fn gguf_name(arch: Architecture, hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "model.norm.bias" => Some("output_norm.bias"),
        // Not an HF tensor: llama.cpp's rope frequency divisors (Llama 3 scaling).
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if arch == Architecture::Gemma2 => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" | "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{suffix}"))
}

/// For each HF row, the GGUF row it comes from under llama.cpp's Q/K permutation (see
/// [`unpermute_rows`]): HF `(head, t, j)` ← GGUF `(head, j, t)` with `t ∈ {0,1}`, `j < hd/2`.
fn unpermute_sources(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    (0..rows)
        .map(|r| {
            let (h, rem) = (r / hd, r % hd);
            let (t, j) = (rem / (hd / 2), rem % (hd / 2));
            h * hd + 2 * j + t
        })
        .collect()
}

/// Undoes llama.cpp's `permute` of Q/K rows (which turns HF's rotate-half rope layout into
/// ggml's interleaved one). Row groups per head: GGUF holds `(heads, head_dim/2, 2, in)`,
/// HF holds `(heads, 2, head_dim/2, in)`.
fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn gguf_value_to_json(v: &gguf_file::Value) -> Value {
    use gguf_file::Value as G;
    match v {
        G::U8(x) => Value::from(*x),
        G::I8(x) => Value::from(*x),
        G::U16(x) => Value::from(*x),
        G::I16(x) => Value::from(*x),
        G::U32(x) => Value::from(*x),
        G::I32(x) => Value::from(*x),
        G::U64(x) => Value::from(*x),
        G::I64(x) => Value::from(*x),
        G::F32(x) => Value::from(f64::from(*x)),
        G::F64(x) => Value::from(*x),
        G::Bool(x) => Value::from(*x),
        G::String(x) => Value::from(x.clone()),
        G::Array(xs) => Value::Array(xs.iter().map(gguf_value_to_json).collect()),
    }
}

/// A buffered reader that knows its own position: candle reads each metadata string with
/// two reads and asks the position once (a vocabulary and its merges are ~100,000 strings),
/// each a system call on a bare file — a third of a small model's start-up.
struct HeaderReader<R> {
    inner: std::io::BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> HeaderReader<R> {
    /// Reads `inner` from where it stands.
    fn new(mut inner: R) -> Self {
        // An unknown position is corrected by the first seek; candle seeks before reading.
        let pos = inner.stream_position().unwrap_or(0);
        HeaderReader {
            inner: std::io::BufReader::with_capacity(1 << 16, inner),
            pos,
        }
    }
}

impl<R: Read> Read for HeaderReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for HeaderReader<R> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        if to == std::io::SeekFrom::Current(0) {
            return Ok(self.pos);
        }
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

/// Reads a GGUF header, refusing absurd counts before candle allocates for them. Tensors of
/// types candle does not know but nextoken converts (IQ4_NL, IQ4_XS) come back with a
/// placeholder type in the header and their real format in the map.
pub(crate) fn read_gguf_header(
    path: &Path,
    file: &mut File,
) -> Result<(gguf_file::Content, HashMap<String, QuantFormat>), LoadError> {
    let len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
    let mut head = [0u8; 24];
    if len < 24 || file.read_exact(&mut head).is_err() {
        return Err(LoadError::format(path, "file too short to be GGUF"));
    }
    if &head[0..4] != b"GGUF" {
        return Err(LoadError::format(path, "not a GGUF file (bad magic)"));
    }
    let n_tensors = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let n_kv = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
    if n_tensors > 1_000_000 || n_kv > 1_000_000 {
        return Err(LoadError::format(
            path,
            "corrupt GGUF header (absurd counts)",
        ));
    }
    file.rewind().map_err(|e| LoadError::io(path, e))?;
    let read = gguf_file::Content::read(&mut HeaderReader::new(&mut *file));
    let (content, foreign) = match read {
        Ok(c) => (c, HashMap::new()),
        // A valid file with tensor types candle does not know (llama.cpp's IQ types) reads
        // as "corrupt": read the ones nextoken converts, name the others.
        Err(e) => match walk_header(file) {
            Some(walk) if !walk.foreign.is_empty() => read_foreign_header(path, file, walk)?,
            _ => return Err(LoadError::format(path, format!("corrupt GGUF header: {e}"))),
        },
    };
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let (block, size) = match foreign.get(name) {
            Some(format) => format.gguf_block(),
            None => (info.ggml_dtype.block_size(), info.ggml_dtype.type_size()),
        };
        let bytes = (elems / block.max(1) * size) as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > len {
            return Err(LoadError::format(
                path,
                format!("truncated: tensor '{name}' ends at byte {end} but the file has {len}"),
            ));
        }
    }
    Ok((content, foreign))
}

/// The formats nextoken converts from GGML types candle's reader does not know.
fn foreign_format(ggml_type: u32) -> Option<QuantFormat> {
    match ggml_type {
        20 => Some(QuantFormat::IQ4NL),
        23 => Some(QuantFormat::IQ4XS),
        _ => None,
    }
}

/// A header whose foreign tensors are all of types nextoken converts: read by candle from a
/// copy whose type fields say F32 instead (candle's header reader checks no sizes), with
/// the real formats kept aside. Otherwise the file is refused, naming the types.
fn read_foreign_header(
    path: &Path,
    file: &mut File,
    walk: HeaderWalk,
) -> Result<(gguf_file::Content, HashMap<String, QuantFormat>), LoadError> {
    let unreadable: Vec<(String, u32)> = walk
        .foreign
        .iter()
        .filter(|t| foreign_format(t.ggml_type).is_none())
        .map(|t| (t.name.clone(), t.ggml_type))
        .collect();
    if let Some(message) = unreadable_types_message(&unreadable) {
        return Err(LoadError::unsupported(path, message));
    }
    let mut header = vec![0u8; usize::try_from(walk.end).unwrap_or(usize::MAX).min(1 << 31)];
    file.rewind()
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|e| LoadError::io(path, e))?;
    let mut foreign = HashMap::new();
    for t in walk.foreign {
        let at = t.type_at as usize;
        header[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        if let Some(format) = foreign_format(t.ggml_type) {
            foreign.insert(t.name, format);
        }
    }
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(header))
        .map_err(|e| LoadError::format(path, format!("corrupt GGUF header: {e}")))?;
    Ok((content, foreign))
}

/// GGML tensor types by id (ggml.h's `ggml_type`), for messages.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
        "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "", "", "", "TQ1_0",
        "TQ2_0", "", "", "", "MXFP4",
    ];
    NAMES.get(id as usize).copied().filter(|n| !n.is_empty())
}

/// GGML tensor types candle's GGUF reader knows.
const READABLE_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// A tensor whose type candle's reader does not know.
struct ForeignTensor {
    name: String,
    ggml_type: u32,
    /// Where its type field is in the file.
    type_at: u64,
}

/// Where a tensor's info fields are in the file.
struct TensorAt {
    name: String,
    /// Its innermost dimension (the row length).
    dim0_at: u64,
    /// Its type.
    type_at: u64,
}

/// What walking a GGUF header found.
struct HeaderWalk {
    /// Tensors of types candle does not know, in header order.
    foreign: Vec<ForeignTensor>,
    /// Every tensor, in header order.
    tensors: Vec<TensorAt>,
    /// Where the tensor infos end (the header's last byte + 1, before alignment).
    end: u64,
}

/// Walks the header of a GGUF file (version 2 or 3) without interpreting it, for its tensors
/// of types candle's reader does not know. `None` when the header cannot be walked (then it
/// is corrupt, or of GGUF version 1).
fn walk_header(file: &mut File) -> Option<HeaderWalk> {
    fn take<const N: usize>(r: &mut impl Read) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok()?;
        Some(b)
    }
    fn u32_(r: &mut impl Read) -> Option<u32> {
        take::<4>(r).map(u32::from_le_bytes)
    }
    fn u64_(r: &mut impl Read) -> Option<u64> {
        take::<8>(r).map(u64::from_le_bytes)
    }
    type Reader<'a> = std::io::BufReader<&'a mut File>;
    fn string(r: &mut Reader) -> Option<String> {
        let len = u64_(r)?;
        if len > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; len as usize];
        r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }
    /// Bytes of one value of a fixed-size metadata type.
    fn fixed(t: u32) -> Option<i64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    /// Skips one metadata value of type `t` (seeking past it: a corrupt length cannot make
    /// this loop for long, reading past the end fails).
    fn skip(r: &mut Reader, t: u32, depth: usize) -> Option<()> {
        let size = match (fixed(t), t) {
            (Some(size), _) => size,
            (None, 8) => i64::try_from(u64_(r)?).ok()?,
            (None, 9) if depth == 0 => {
                let (et, n) = (u32_(r)?, u64_(r)?);
                if let Some(size) = fixed(et) {
                    i64::try_from(n).ok()?.checked_mul(size)?
                } else {
                    for _ in 0..n {
                        skip(r, et, depth + 1)?;
                    }
                    return Some(());
                }
            }
            _ => return None,
        };
        r.seek_relative(size).ok()?;
        Some(())
    }
    file.rewind().ok()?;
    let mut r = std::io::BufReader::new(file);
    let magic = take::<4>(&mut r)?;
    let version = u32_(&mut r)?;
    if &magic != b"GGUF" || !(2..=3).contains(&version) {
        return None;
    }
    let (n_tensors, n_kv) = (u64_(&mut r)?, u64_(&mut r)?);
    if n_tensors > 1_000_000 || n_kv > 1_000_000 {
        return None;
    }
    for _ in 0..n_kv {
        string(&mut r)?;
        let t = u32_(&mut r)?;
        skip(&mut r, t, 0)?;
    }
    let (mut foreign, mut tensors) = (Vec::new(), Vec::new());
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let dims = u32_(&mut r)?;
        let dim0_at = r.stream_position().ok()?;
        if dims > 8 {
            return None;
        }
        for _ in 0..dims {
            u64_(&mut r)?;
        }
        let type_at = r.stream_position().ok()?;
        let t = u32_(&mut r)?;
        u64_(&mut r)?;
        if !READABLE_TYPES.contains(&t) {
            foreign.push(ForeignTensor {
                name: name.clone(),
                ggml_type: t,
                type_at,
            });
        }
        tensors.push(TensorAt {
            name,
            dim0_at,
            type_at,
        });
    }
    let end = r.stream_position().ok()?;
    Some(HeaderWalk {
        foreign,
        tensors,
        end,
    })
}

/// Gives tensors of the GGUF file at `path` their real type and row length: for types
/// candle cannot write (IQ4_NL, IQ4_XS), written as placeholders of the same byte size.
/// `retype` maps GGUF names to `(ggml type, row length)`.
pub(crate) fn retype_gguf_tensors(
    path: &Path,
    retype: &HashMap<String, (u32, u64)>,
) -> Result<(), LoadError> {
    use std::io::Write;
    let io = |e| LoadError::io(path, e);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let walk = walk_header(&mut file)
        .ok_or_else(|| LoadError::format(path, "GGUF header does not walk"))?;
    let mut done = 0;
    for t in &walk.tensors {
        if let Some(&(ggml_type, dim0)) = retype.get(&t.name) {
            for (at, bytes) in [
                (t.dim0_at, dim0.to_le_bytes().to_vec()),
                (t.type_at, ggml_type.to_le_bytes().to_vec()),
            ] {
                file.seek(std::io::SeekFrom::Start(at))
                    .and_then(|_| file.write_all(&bytes))
                    .map_err(io)?;
            }
            done += 1;
        }
    }
    if done != retype.len() {
        return Err(LoadError::format(path, "a tensor to retype is missing"));
    }
    Ok(())
}

/// Why a GGUF header that walks cleanly was refused: its tensor types (None when all are
/// readable, and the header is corrupt after all).
fn unreadable_types_message(unreadable: &[(String, u32)]) -> Option<String> {
    let (first, t) = unreadable.first()?;
    let name = |t: u32| ggml_type_name(t).map_or(format!("unknown type {t}"), str::to_string);
    let mut kinds: Vec<String> = unreadable.iter().map(|&(_, t)| name(t)).collect();
    kinds.sort();
    kinds.dedup();
    Some(format!(
        "tensor type {} in {} tensor(s) (the first: '{first}', {}); nextoken reads F32, F16, \
         BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K–Q6_K, IQ4_NL and IQ4_XS — use a file \
         quantized to one of these (e.g. Q4_K_M or Q8_0)",
        kinds.join(", "),
        unreadable.len(),
        name(*t),
    ))
}

/// The raw bytes of a GGUF tensor (of `foreign`'s format where candle does not know its
/// type).
fn tensor_bytes(
    file: &mut File,
    content: &gguf_file::Content,
    info: &gguf_file::TensorInfo,
    foreign: Option<QuantFormat>,
) -> std::io::Result<Vec<u8>> {
    let (block, size) = match foreign {
        Some(format) => format.gguf_block(),
        None => (info.ggml_dtype.block_size(), info.ggml_dtype.type_size()),
    };
    let mut data = vec![0u8; info.shape.elem_count() / block * size];
    file.seek(std::io::SeekFrom::Start(
        content.tensor_data_offset + info.offset,
    ))?;
    file.read_exact(&mut data)?;
    Ok(data)
}

fn load_safetensors_file(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let data = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    candle_core::safetensors::load_buffer(&data, &Device::Cpu)
        .map_err(|e| LoadError::format(path, format!("corrupt safetensors: {e}")))
}

impl Weights {
    /// Opens a GGUF file and returns its weights and its metadata as JSON values.
    pub fn open_gguf(path: &Path) -> Result<(Self, serde_json::Map<String, Value>), LoadError> {
        let mut file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        let (content, foreign) = read_gguf_header(path, &mut file)?;
        let metadata = content
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), gguf_value_to_json(v)))
            .collect();
        let weights = Weights {
            path: path.to_path_buf(),
            source: Source::Gguf {
                file,
                content,
                foreign,
                heads: None,
                arch: Architecture::Llama,
            },
        };
        Ok((weights, metadata))
    }

    /// Loads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut tensors = HashMap::new();
        if single.exists() {
            tensors = load_safetensors_file(&single)?;
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| LoadError::io(&index, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::format(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| LoadError::format(&index, "no weight_map"))?;
            let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                if shard.contains('/') || shard.contains("..") {
                    return Err(LoadError::format(
                        &index,
                        format!("bad shard name '{shard}'"),
                    ));
                }
                tensors.extend(load_safetensors_file(&dir.join(shard))?);
            }
        } else {
            return Err(LoadError::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in the folder",
            ));
        }
        Ok(Weights {
            path: dir.to_path_buf(),
            source: Source::Safetensors(tensors),
        })
    }

    /// Weights already in memory (tiny models built in tests, adapters). `label` names them in
    /// errors.
    pub fn from_tensors(label: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Weights {
            path: label.to_path_buf(),
            source: Source::Safetensors(tensors),
        }
    }

    /// The file or folder the weights come from (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the GGUF reader the architecture: its tensor names, and for llama (whose Q/K
    /// rows llama.cpp permutes) the head counts, so Q/K rows come out in HF layout.
    pub fn set_gguf_architecture(&mut self, config: &super::ModelConfig) {
        if let Source::Gguf { heads, arch, .. } = &mut self.source {
            *arch = config.architecture;
            *heads = (config.architecture.gguf_name() == "llama")
                .then_some((config.num_heads, config.num_kv_heads));
        }
    }

    /// Whether the tensors come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    /// Whether a tensor of that HF name exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(t) => t.contains_key(name),
            Source::Gguf { content, arch, .. } => {
                gguf_name(*arch, name).is_some_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    /// How many heads' rows of `name` llama.cpp permuted (Q and K of llama GGUFs).
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        match &self.source {
            Source::Gguf {
                heads: Some((h, kv)),
                ..
            } => {
                if name.ends_with("q_proj.weight") {
                    Some(*h)
                } else if name.ends_with("k_proj.weight") {
                    Some(*kv)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The 2-D weight `name` as a [`Linear`]: GGUF Q4_1/Q8_0 stay quantized (read as raw
    /// blocks), Q4_0 too (as the Q4_1 blocks of the same weights); everything else is loaded
    /// as f32.
    pub fn get_linear(&mut self, name: &str, shape: [usize; 2]) -> Result<Linear, LoadError> {
        let path = self.path.clone();
        let permute = self.permuted_heads(name);
        if let Source::Gguf {
            file,
            content,
            foreign,
            arch,
            ..
        } = &mut self.source
        {
            let g = gguf_name(*arch, name).unwrap_or_default();
            if let Some(info) = content.tensor_infos.get(&g) {
                let foreign = foreign.get(&g).copied();
                let format = foreign.or(match info.ggml_dtype {
                    GgmlDType::Q4_0 | GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
                    GgmlDType::Q8_0 | GgmlDType::Q5_0 => Some(QuantFormat::Q8_0),
                    GgmlDType::Q4K => Some(QuantFormat::Q4K),
                    GgmlDType::Q6K => Some(QuantFormat::Q6K),
                    GgmlDType::Q5_1 => Some(QuantFormat::Q5_1),
                    GgmlDType::Q5K => Some(QuantFormat::Q5K),
                    GgmlDType::Q3K => Some(QuantFormat::Q3K),
                    _ => None,
                });
                if let Some(format) = format {
                    if info.shape.dims() != shape {
                        return Err(LoadError::format(
                            &path,
                            format!(
                                "shape mismatch for '{name}': config implies {shape:?}, weights have {:?}",
                                info.shape.dims()
                            ),
                        ));
                    }
                    let mut data = tensor_bytes(file, content, info, foreign)
                        .map_err(|e| LoadError::io(&path, e))?;
                    let converted = match (foreign, info.ggml_dtype) {
                        (None, GgmlDType::Q4_0) => Some(super::quant::q4_0_as_q4_1(&data)),
                        (None, GgmlDType::Q5_0) => Some(super::quant::q5_0_as_q8_0(&data)),
                        _ => None,
                    };
                    if let Some(converted) = converted {
                        data = converted
                            .map_err(|e| LoadError::format(&path, format!("tensor '{g}': {e}")))?;
                    }
                    let mut q = QMatrix::from_gguf_bytes(format, shape[0], shape[1], &data)
                        .map_err(|e| LoadError::format(&path, format!("tensor '{g}': {e}")))?;
                    if let Some(h) = permute.filter(|&h| shape[0].is_multiple_of(2 * h)) {
                        q = q.gather_rows(&unpermute_sources(shape[0], h));
                    }
                    return Linear::quantized(q, None).map_err(|e| LoadError::format(&path, e));
                }
            }
        }
        Ok(Linear::new(self.get(name, &shape)?, None))
    }

    /// The tensor `name` as f32, checked against `shape`.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let path = self.path.clone();
        let tensor = match &mut self.source {
            Source::Safetensors(t) => t
                .get(name)
                .cloned()
                .ok_or_else(|| LoadError::format(&path, format!("missing tensor '{name}'")))?,
            Source::Gguf {
                file,
                content,
                foreign,
                heads,
                arch,
            } => {
                let g = gguf_name(*arch, name).ok_or_else(|| {
                    LoadError::format(&path, format!("no GGUF name for tensor '{name}'"))
                })?;
                let Some(info) = content.tensor_infos.get(&g) else {
                    return Err(LoadError::format(&path, format!("missing tensor '{g}'")));
                };
                let bad = |e: String| LoadError::format(&path, format!("tensor '{g}': {e}"));
                let t = match foreign.get(&g).copied() {
                    // Types candle does not know: through the panels, exactly.
                    Some(format) => {
                        let data = tensor_bytes(file, content, info, Some(format))
                            .map_err(|e| LoadError::io(&path, e))?;
                        let dims = info.shape.dims().to_vec();
                        let cols = dims.last().copied().unwrap_or(1);
                        let rows = info.shape.elem_count() / cols.max(1);
                        let values = QMatrix::from_gguf_bytes(format, rows, cols, &data)
                            .map_err(bad)?
                            .dequantize();
                        Tensor::from_vec(values, dims, &Device::Cpu)
                            .map_err(|e| bad(e.to_string()))?
                    }
                    None => content
                        .tensor(file, &g, &Device::Cpu)
                        .and_then(|q| q.dequantize(&Device::Cpu))
                        .map_err(|e| bad(e.to_string()))?,
                };
                let permute_heads = match (heads, name) {
                    (Some((h, _)), n) if n.ends_with("q_proj.weight") => Some(*h),
                    (Some((_, kv)), n) if n.ends_with("k_proj.weight") => Some(*kv),
                    _ => None,
                };
                match permute_heads {
                    Some(h) if t.rank() == 2 && t.dim(0).is_ok_and(|r| r % (2 * h) == 0) => {
                        unpermute_rows(&t, h).map_err(|e| LoadError::format(&path, e))?
                    }
                    _ => t,
                }
            }
        };
        if tensor.dims() != shape {
            return Err(LoadError::format(
                &path,
                format!(
                    "shape mismatch for '{name}': config implies {shape:?}, weights have {:?}",
                    tensor.dims()
                ),
            ));
        }
        match tensor.dtype() {
            DType::F32 => Ok(tensor),
            DType::F16 | DType::BF16 => tensor
                .to_dtype(DType::F32)
                .map_err(|e| LoadError::format(&path, e)),
            other => Err(LoadError::unsupported(
                &path,
                format!("tensor '{name}' has dtype {other:?} (supported: f32, f16, bf16, GGUF)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header reader's position follows reads and seeks of every kind, and reads after a
    /// seek return the bytes there (the answers candle's header parser relies on).
    #[test]
    fn header_reader_tracks_its_position() {
        use std::io::{Cursor, SeekFrom};
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut inner = Cursor::new(data.clone());
        inner.set_position(5);
        let mut r = HeaderReader::new(inner);
        let mut b = [0u8; 10];
        r.read_exact(&mut b).expect("read");
        assert_eq!(
            (b.to_vec(), r.stream_position().ok()),
            (data[5..15].to_vec(), Some(15))
        );
        assert_eq!(r.seek(SeekFrom::End(0)).ok(), Some(200_000));
        assert_eq!(r.seek(SeekFrom::Start(70_000)).ok(), Some(70_000));
        let mut big = vec![0u8; 100_000];
        r.read_exact(&mut big).expect("read across buffer refills");
        assert_eq!(
            (&big[..], r.stream_position().ok()),
            (&data[70_000..170_000], Some(170_000))
        );
        assert_eq!(r.seek(SeekFrom::Current(-169_990)).ok(), Some(10));
        r.read_exact(&mut b[..2]).expect("read");
        assert_eq!(
            (&b[..2], r.stream_position().ok()),
            (&data[10..12], Some(12))
        );
        assert_eq!(r.seek(SeekFrom::Current(7)).ok(), Some(19));
        r.read_exact(&mut b[..1]).expect("read");
        assert_eq!(b[0], data[19]);
    }

    /// A GGUF v3 header with one metadata array (`count` values of type `elem`, no data) and
    /// no tensors, walked by [`walk_header`] (the foreign tensors' names and types).
    fn walk_array(elem: u32, count: u64) -> Option<Vec<(String, u32)>> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.push(b'a');
        b.extend(9u32.to_le_bytes());
        b.extend(elem.to_le_bytes());
        b.extend(count.to_le_bytes());
        let mut f = tempfile::tempfile().expect("tempfile");
        std::io::Write::write_all(&mut f, &b).expect("write");
        walk_header(&mut f).map(|w| {
            w.foreign
                .into_iter()
                .map(|t| (t.name, t.ggml_type))
                .collect()
        })
    }

    #[test]
    fn corrupt_array_lengths_end_the_walk_at_once() {
        // An absurd count of fixed-size values: one seek (past the end), or an overflow.
        assert_eq!(walk_array(0, 1 << 40), Some(Vec::new()));
        assert_eq!(walk_array(10, u64::MAX / 2), None);
        // An absurd count of strings: the first length read past the end stops it.
        assert_eq!(walk_array(8, u64::MAX), None);
        // Nested arrays are not walked.
        assert_eq!(walk_array(9, 1), None);
    }

    #[test]
    fn gguf_names_map_llama_tensors() {
        assert_eq!(
            gguf_name(
                Architecture::Llama,
                "model.layers.3.self_attn.k_proj.weight"
            )
            .as_deref(),
            Some("blk.3.attn_k.weight")
        );
        assert_eq!(
            gguf_name(
                Architecture::Llama,
                "model.layers.12.post_attention_layernorm.weight"
            )
            .as_deref(),
            Some("blk.12.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name(Architecture::Llama, "lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name(Architecture::Llama, "model.layers.0.weird.weight"),
            None
        );
    }

    #[test]
    fn unpermute_sources_match_the_tensor_unpermute() -> candle_core::Result<()> {
        let (heads, rows, cols) = (3, 12, 2);
        let gguf =
            Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        let hf = unpermute_rows(&gguf, heads)?.to_vec2::<f32>()?;
        let g = gguf.to_vec2::<f32>()?;
        for (r, src) in unpermute_sources(rows, heads).into_iter().enumerate() {
            assert_eq!(hf[r], g[src]);
        }
        Ok(())
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        // llama.cpp: w.reshape(h, 2, rows/h/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, rows, cols) = (2, 8, 3);
        let hf = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        let gguf = hf
            .reshape((heads, 2, rows / heads / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
        let back = unpermute_rows(&gguf, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
