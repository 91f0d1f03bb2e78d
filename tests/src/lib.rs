//! Multi-node tests through the public interfaces; see tests/ in this crate.
