//! `StopMatcher`: ends the text at the first stop string, even when it is split across tokens.
//! Text that could be the start of a stop string is held back until it is clear that it is not,
//! so a stop string never reaches the client.

/// Result of pushing a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit now (may be empty while a possible match is held back).
    Emit(String),
    /// A stop string was found; this is the text before it. Nothing more may be emitted.
    Stopped(String),
}

/// Matches stop strings over a stream of text pieces.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds text; returns what can be emitted or that a stop string was reached.
    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.held.push_str(delta);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..pos].to_string();
            self.held.clear();
            return StopCheck::Stopped(before);
        }
        // Longest suffix of the held text that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > keep && self.held.ends_with(&s[..k]) {
                    keep = k;
                }
            }
        }
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck::Emit(emit)
    }

    /// The text still held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Emit(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_removed() {
        assert_eq!(
            run(&["\n\n"], &["Paris", ".", "\n", "\n", "The"]),
            ("Paris.".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "Dxyz"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn partial_matches_are_held_then_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("go ST"), StopCheck::Emit("go ".into()));
        assert_eq!(m.push("OR"), StopCheck::Emit("STOR".into()));
        assert_eq!(run(&["STOP"], &["ST", "ST", "x"]), ("STSTx".into(), false));
        assert_eq!(
            run(&["STOP"], &["end ST"]),
            ("end ST".into(), false),
            "flushed at the end"
        );
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(
            run(&["😀!"], &["héllo 😀", "?"]),
            ("héllo 😀?".into(), false)
        );
        assert_eq!(run(&["😀!"], &["héllo 😀", "!"]), ("héllo ".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}
