//! Operations over whole chains.
