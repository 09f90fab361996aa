//! `Detokenizer`: turns a stream of token ids into a stream of text pieces that never split a
//! UTF-8 character. A token may hold only part of a character (byte-level BPE, byte fallback):
//! its text is held back until the character is complete. Decoding a window of previous tokens
//! together with the new ones also keeps decoders that strip or merge spaces right.

use std::sync::Arc;

use super::{TextError, Tokenizer};

/// Incremental decoder for one sequence.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window that is decoded for context.
    prefix_offset: usize,
    /// End of the text already emitted (in ids).
    read_offset: usize,
}

impl Detokenizer {
    /// A decoder for a new sequence. Special tokens are dropped from the text if `skip_special`.
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special: bool) -> Self {
        Detokenizer {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token; returns the text it completes, or `None` while bytes are pending.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        // A trailing U+FFFD means an unfinished UTF-8 sequence: wait for the next token.
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the end of the stream), decoded as is.
    pub fn flush(&mut self) -> Result<Option<String>, TextError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}
