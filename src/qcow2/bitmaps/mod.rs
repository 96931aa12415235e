//! Persistent dirty bitmaps (spec: "Bitmaps"): kept valid through every write of an image
//! opened for writing (`track.rs`), managed as `qemu-img bitmap` does (`manage.rs`), read
//! by backup tools as dirty ranges ([`DirtyBitmap::runs`]). The directory and its switch
//! are `directory.rs`, a bitmap's clusters `data.rs`.

mod data;
mod directory;
mod dirty;
mod manage;
mod state;
mod track;

pub use dirty::{DirtyBitmap, DirtyRuns};
pub use manage::BitmapInfo;
pub(crate) use state::BitmapSet;
