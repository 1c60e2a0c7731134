//! Features only: see this crate's `Cargo.toml` for why it exists.
