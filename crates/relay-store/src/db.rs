//! The database handle the store and the commits it seals share. redb fails every operation
//! after a failed write (a full disk, say) until the file is closed and opened again, so the
//! handle reopens it after an I/O failure: reads go on, and the same commit can be written
//! again once there is space.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use redb::Database;

use crate::Fail;

pub(crate) struct Db {
    path: PathBuf,
    state: RwLock<State>,
}

struct State {
    /// Bumped on every reopening, so two threads that saw the same failure reopen once.
    generation: u64,
    /// `None` after a reopening failed: the next use tries again.
    db: Option<Database>,
}

impl Db {
    pub(crate) fn open(path: &Path) -> Result<Db, Fail> {
        let db = Database::create(path)?;
        Ok(Db {
            path: path.to_owned(),
            state: RwLock::new(State {
                generation: 0,
                db: Some(db),
            }),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database, reopening it first if an earlier failure left it closed, and
    /// after `f` if `f` failed on I/O.
    pub(crate) fn with<T>(&self, f: impl Fn(&Database) -> Result<T, Fail>) -> Result<T, Fail> {
        let (generation, result) = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            (state.generation, state.db.as_ref().map(&f))
        };
        match result {
            Some(Err(e)) if e.closes_db() => {
                // Reopened now, not on the next use: reads must not wait for a commit.
                let _ = self.reopen(generation);
                Err(e)
            }
            Some(r) => r,
            None => {
                self.reopen(generation)?;
                let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
                match &state.db {
                    Some(db) => f(db),
                    None => Err(Fail::Db(redb::Error::DatabaseClosed)),
                }
            }
        }
    }

    fn reopen(&self, seen: u64) -> Result<(), Fail> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.generation != seen && state.db.is_some() {
            return Ok(());
        }
        state.generation += 1;
        // Dropped first: it holds the file's lock, which the new handle takes.
        state.db = None;
        state.db = Some(Database::create(&self.path)?);
        Ok(())
    }
}
