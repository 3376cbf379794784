//! Per-app tables indexed by [`AppIdx`].
//!
//! An [`AppIdx`] is only made by [`crate::app::Apps`] (by id, by key, or
//! while iterating), always below `Apps::len`, and an app keeps its slot
//! for the node's life (slots are only added); a [`PerApp`] is built with
//! one entry per slot ([`PerApp::new`]) and grown with every new snapshot
//! of the apps before that snapshot is used ([`PerApp::grow`]). So indexing
//! a `PerApp` with an `AppIdx` of the `Apps` its owner holds cannot go out
//! of bounds. [`PerApp::get`] is there for an index from anywhere else.

use std::ops::{Index, IndexMut};

use crate::app::AppIdx;

/// One `T` per app of the node.
#[derive(Debug, Clone, Default)]
pub struct PerApp<T>(Vec<T>);

impl<T> PerApp<T> {
    /// One entry per app (`apps` = `Apps::len`), each made by `make`.
    pub fn new(apps: usize, make: impl FnMut() -> T) -> Self {
        let mut make = make;
        Self((0..apps).map(|_| make()).collect())
    }

    /// One entry more per slot up to `apps` (`Apps::len`), each made by
    /// `make`; never shrinks.
    pub fn grow(&mut self, apps: usize, make: impl FnMut() -> T) {
        let mut make = make;
        while self.0.len() < apps {
            self.0.push(make());
        }
    }

    /// The entry of `app`, if it is an app of this table.
    pub fn get(&self, app: AppIdx) -> Option<&T> {
        self.0.get(app.0 as usize)
    }

    /// Every entry with its app, in app order.
    pub fn iter(&self) -> impl Iterator<Item = (AppIdx, &T)> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, t)| (AppIdx(i as u32), t))
    }

    /// Every entry with its app, mutably, in app order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (AppIdx, &mut T)> {
        self.0
            .iter_mut()
            .enumerate()
            .map(|(i, t)| (AppIdx(i as u32), t))
    }

    /// The apps of the table.
    pub fn apps(&self) -> impl Iterator<Item = AppIdx> {
        (0..self.0.len()).map(|i| AppIdx(i as u32))
    }
}

/// Valid for every `AppIdx` of the `Apps` the table was built for (see the
/// module docs).
impl<T> Index<AppIdx> for PerApp<T> {
    type Output = T;

    fn index(&self, app: AppIdx) -> &T {
        &self.0[app.0 as usize]
    }
}

impl<T> IndexMut<AppIdx> for PerApp<T> {
    fn index_mut(&mut self, app: AppIdx) -> &mut T {
        &mut self.0[app.0 as usize]
    }
}
