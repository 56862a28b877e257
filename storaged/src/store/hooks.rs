//! Where a store's device and catalog I/O can be wrapped.
//!
//! Fault injection ([`crate::engine::fault`]) wraps the engine; power-loss
//! simulation ([`crate::crash`]) wraps every path that writes the pool: the
//! engine (the pool's and a replacement device's), the metadata files
//! (roots and manifests) and the catalog's storage. Each method defaults to
//! the real thing, so production opens with [`NoHooks`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::catalog::BackendFactory;
use crate::engine::memory::MemoryDisk;
use crate::engine::{DeviceFile, IoBackend};

pub trait IoHooks: Send + Sync {
    /// Wraps an engine whose device `i` is at `paths[i]`: the pool's at
    /// open, a replacement device's during `device replace`.
    fn engine(&self, engine: Arc<dyn IoBackend>, paths: &[PathBuf]) -> Arc<dyn IoBackend> {
        let _ = paths;
        engine
    }

    /// The metadata I/O of the device at `path`, already opened as `file`.
    fn meta_file(&self, file: File, path: &Path) -> Arc<dyn DeviceFile> {
        let _ = path;
        Arc::new(file)
    }

    /// Storage for the catalog at `path`, if not redb's file backend.
    fn catalog(&self, path: &Path) -> Option<BackendFactory> {
        let _ = path;
        None
    }
}

/// The real thing everywhere.
pub struct NoHooks;

impl IoHooks for NoHooks {}

/// Every engine on a [`MemoryDisk`] (store tests that need no kernel I/O);
/// metadata and catalog on their files as usual.
pub struct MemoryHooks(pub Arc<MemoryDisk>);

impl IoHooks for MemoryHooks {
    fn engine(&self, _engine: Arc<dyn IoBackend>, paths: &[PathBuf]) -> Arc<dyn IoBackend> {
        Arc::new(self.0.engine(paths))
    }
}

/// Wraps the pool's engine with a closure, once ([`super::Store::open_with`]);
/// nothing else.
pub struct WrapEngineOnce<F>(Mutex<Option<F>>);

impl<F> WrapEngineOnce<F> {
    pub fn new(wrap: F) -> Self {
        Self(Mutex::new(Some(wrap)))
    }
}

impl<F> IoHooks for WrapEngineOnce<F>
where
    F: FnOnce(Arc<dyn IoBackend>) -> Arc<dyn IoBackend> + Send,
{
    fn engine(&self, engine: Arc<dyn IoBackend>, _paths: &[PathBuf]) -> Arc<dyn IoBackend> {
        match self.0.lock().expect("hook poisoned").take() {
            Some(wrap) => wrap(engine),
            None => engine,
        }
    }
}
