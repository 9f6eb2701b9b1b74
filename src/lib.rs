//! cairn: a sector-level disk imager for Linux.
//!
//! Data flows one way: device (source reader) → backup (block stage) → repo/format (segment writer);
//! restore is the mirror image. See docs/format.md for the on-disk format.

pub mod backup;
pub mod chain;
pub mod cli;
pub mod device;
pub mod disks;
pub mod format;
pub mod list;
pub mod mount;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod ptable;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod tracker;
pub mod usedmap;
pub mod verify;
