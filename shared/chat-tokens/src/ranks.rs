//! `o200k_base`, built from `o200k_base.ranks`: the encoding's 199,998 ordinary tokens in rank
//! order, stored as a little-endian `u32` count, then each token's length as one byte, then the
//! tokens' bytes back to back. That is 1.6 MB against the 3.6 MB of base64 text tiktoken-rs
//! bundles (1.0 MB against 1.7 MB once zipped), and it needs no decoding to load.
//!
//! The file is generated from tiktoken-rs's own copy; a test checks the two agree token for
//! token, and rewrites the file when run with `CHAT_TOKENS_WRITE_RANKS=1`.

use rustc_hash::FxHashMap;
use tiktoken_rs::{CoreBPE, Rank, ENDOFPROMPT, ENDOFTEXT, O200K_BASE_PAT_STR};

static O200K_RANKS: &[u8] = include_bytes!("../o200k_base.ranks");

/// The special tokens `o200k_base` defines, as tiktoken-rs does.
const SPECIAL: [(&str, Rank); 2] = [(ENDOFTEXT, 199_999), (ENDOFPROMPT, 200_018)];

/// The tokens of a ranks file, in rank order.
pub(crate) fn tokens(file: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (count, rest) = file.split_first_chunk::<4>().expect("a ranks file starts with its count");
    let count = u32::from_le_bytes(*count) as usize;
    let (lengths, mut bodies) = rest.split_at(count);
    lengths.iter().map(move |&length| {
        let (token, rest) = bodies.split_at(usize::from(length));
        bodies = rest;
        token
    })
}

/// The ranks file for these tokens (in rank order).
#[cfg(test)]
pub(crate) fn file<'a>(tokens: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let mut file = u32::try_from(tokens.len()).expect("fewer than 2^32 tokens").to_le_bytes().to_vec();
    file.extend(tokens.clone().map(|t| u8::try_from(t.len()).expect("tokens are at most 255 bytes")));
    tokens.for_each(|t| file.extend_from_slice(t));
    file
}

/// The encoding, ready to count.
pub(crate) fn o200k_base() -> CoreBPE {
    let encoder: FxHashMap<Vec<u8>, Rank> =
        tokens(O200K_RANKS).zip(0..).map(|(token, rank)| (token.to_vec(), rank)).collect();
    let special = SPECIAL.iter().map(|&(text, rank)| (text.to_owned(), rank)).collect();
    CoreBPE::new(encoder, special, O200K_BASE_PAT_STR).expect("o200k_base's pattern compiles")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranks as tiktoken-rs bundles them (base64 text, parsed by tiktoken-rs itself).
    fn upstream() -> Vec<Vec<u8>> {
        let bpe = tiktoken_rs::o200k_base_singleton();
        (0..).map_while(|rank| bpe.decode_bytes(&[rank]).ok()).collect()
    }

    #[test]
    fn the_compact_ranks_are_tiktokens_token_for_token() {
        let upstream = upstream();
        let expected = file(upstream.iter().map(Vec::as_slice));
        if std::env::var_os("CHAT_TOKENS_WRITE_RANKS").is_some() {
            std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/o200k_base.ranks"), &expected).unwrap();
        }
        assert_eq!(tokens(O200K_RANKS).count(), upstream.len());
        assert!(
            O200K_RANKS == expected.as_slice(),
            "o200k_base.ranks differs from tiktoken-rs's o200k_base: rerun this test with CHAT_TOKENS_WRITE_RANKS=1"
        );
        // The next rank is a special token, not an ordinary one we missed.
        assert_eq!(tiktoken_rs::o200k_base_singleton().decode_bytes(&[199_998]).ok(), None);
    }

    #[test]
    fn counts_and_tokens_agree_with_tiktoken() {
        let ours = o200k_base();
        let theirs = tiktoken_rs::o200k_base_singleton();
        for text in [
            "hello world",
            "ünïcode 🦀 text\nwith lines\r\n and   spaces",
            "fn main() { println!(\"{}\", 1 + 2); }",
            "Die Straße ist naß. 日本語のテキスト。 العربية",
            "<|endoftext|> is ordinary text here",
            &"word ".repeat(500),
        ] {
            assert_eq!(ours.encode_ordinary(text), theirs.encode_ordinary(text), "{text:?}");
        }
    }
}
