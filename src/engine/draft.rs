//! Draft tokens for speculative decoding by prompt lookup (n-gram matching): the tokens that
//! followed the latest earlier occurrence of a sequence's last few tokens. Editing code and
//! answering about a text copy long runs of the context, which these drafts guess for free.
//!
//! The step computes the last token and the drafts in one forward (a few extra rows cost
//! little next to reading every weight for one row), then samples each row in order with the
//! sequence's own sampler and keeps drafts while they equal what was sampled. Every row's
//! logits are those of plain decoding (the kernels compute each row the same way whatever the
//! batch) and the sampler draws once per kept token, so the tokens are exactly those of
//! decoding one token per step, for greedy and seeded sampling alike: a draft only decides how
//! many of them one step yields.

use crate::model::TokenId;

/// Longest suffix looked up.
pub const MAX_NGRAM: usize = 4;
/// Shortest suffix looked up: single tokens match too often by chance to be worth rows.
pub const MIN_NGRAM: usize = 2;
/// Tokens searched back from the end (bounds the per-step cost on long contexts).
const SEARCH_WINDOW: usize = 8192;

/// Up to `max` tokens that followed the most recent earlier occurrence of the longest suffix
/// of `tokens` (from [`MAX_NGRAM`] down to [`MIN_NGRAM`] tokens) found in it; empty when none
/// occurs.
pub fn ngram_draft(tokens: &[TokenId], max: usize) -> Vec<TokenId> {
    let len = tokens.len();
    if max == 0 {
        return Vec::new();
    }
    let lo = len.saturating_sub(SEARCH_WINDOW);
    for n in (MIN_NGRAM..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Latest start first; the match must end before the suffix itself starts to overlap
        // its own end (`start + n < len`), so something follows it.
        for start in (lo..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + max).min(len);
                return tokens[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_gives_what_followed_it() {
        // "1 2 3 4 | 9 9 | 1 2 3 5 6 | ... 2 3" : suffix [2, 3] last occurred before 5.
        let t = [1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 7, 2, 3];
        assert_eq!(ngram_draft(&t, 3), vec![5, 6, 7]);
        assert_eq!(ngram_draft(&t, 1), vec![5]);
        // A longer suffix wins over a more recent shorter one: [1, 2, 3] matches at 0 (then 4),
        // [2, 3] alone would match later (then 5).
        let t = [1, 2, 3, 4, 8, 2, 3, 5, 1, 2, 3];
        assert_eq!(ngram_draft(&t, 2), vec![4, 8]);
        // Four tokens [9, 1, 2, 3] at 0 (then 4) over three [1, 2, 3] at 5 (then 6).
        let t = [9, 1, 2, 3, 4, 1, 2, 3, 6, 9, 1, 2, 3];
        assert_eq!(ngram_draft(&t, 2), vec![4, 1]);
    }

    #[test]
    fn drafts_stop_at_the_end_of_the_tokens() {
        // The match's continuation runs into the suffix itself: only what exists is drafted.
        let t = [5, 6, 5, 6];
        assert_eq!(ngram_draft(&t, 8), vec![5, 6]);
        // A repeated token: [3, 3] at 0 (the only start with something after it) → one 3.
        assert_eq!(ngram_draft(&[3, 3, 3], 4), vec![3]);
    }

    #[test]
    fn no_match_no_draft() {
        assert!(ngram_draft(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(ngram_draft(&[1, 2, 3, 1, 2, 3], 0).is_empty());
        assert!(ngram_draft(&[], 4).is_empty());
        assert!(ngram_draft(&[1], 4).is_empty());
        // A single-token suffix is not looked up.
        assert!(ngram_draft(&[4, 5, 6, 4], 4).is_empty());
    }
}
