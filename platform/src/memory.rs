//! How a DataFlow process gives memory back: mimalloc, the `dataflow` binary's allocator,
//! returns freed pages to the system within milliseconds, and SQLite allocates from
//! mimalloc too. The only unsafe code of DataFlow: two C libraries configured through
//! their documented hooks.
//!
//! Why: a worker's memory turns over a chunk at a time, at tens of megabytes a second. With
//! mimalloc's default delay before it purges freed pages (a second), a worker kept about a
//! second of that turnover resident. SQLite, on the C library's `malloc`, kept what its
//! statements freed in one glibc arena per connection thread (sqlx runs each connection
//! on a thread of its own), so a worker's memory grew with its pool rather than with
//! what SQLite held.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_long, c_void};
use std::sync::Once;

use libmimalloc_sys as mi;
use libsqlite3_sys as sqlite;

/// `mi_option_purge_delay`, the 16th entry of `mi_option_t` in mimalloc 3's `mimalloc.h`,
/// which the Rust binding does not name (no test can tell one option from another: setting
/// and reading back any index agree).
const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// Freed pages go back to the system after this long: what mimalloc 2 does, and mimalloc
/// 3's own documentation says.
const PURGE_DELAY_MS: c_long = 10;

/// Makes mimalloc purge freed pages after [`PURGE_DELAY_MS`]; called at process start. A
/// `MIMALLOC_PURGE_DELAY` (or its old name, `MIMALLOC_RESET_DELAY`) in the environment still
/// wins.
pub fn return_freed_memory_promptly() {
    if ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return;
    }
    // SAFETY: sets one of mimalloc's options, which it reads at each purge.
    unsafe { mi::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// Hands SQLite's allocations to mimalloc, once per process. Must run before SQLite
/// initializes, that is before the process's first SQLite connection: the ledger calls
/// it on the way to every SQLite pool. Too late, SQLite keeps `malloc` (logged).
pub(crate) fn sqlite_allocates_from_mimalloc() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let methods = sqlite::sqlite3_mem_methods {
            xMalloc: Some(malloc),
            xFree: Some(free),
            xRealloc: Some(realloc),
            xSize: Some(size),
            xRoundup: Some(roundup),
            xInit: Some(init),
            xShutdown: Some(shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: both options are valid before SQLite initializes (it copies `methods`);
        // after, it refuses them with SQLITE_MISUSE and changes nothing. Its memory
        // statistics go too: they take a global mutex on every allocation, and nothing
        // here reads them.
        let (alloc, stats) = unsafe {
            (
                sqlite::sqlite3_config(sqlite::SQLITE_CONFIG_MALLOC, &raw const methods),
                sqlite::sqlite3_config(sqlite::SQLITE_CONFIG_MEMSTATUS, 0 as c_int),
            )
        };
        if alloc != sqlite::SQLITE_OK || stats != sqlite::SQLITE_OK {
            tracing::warn!(
                alloc,
                stats,
                "SQLite started before DataFlow configured its memory; it keeps the C allocator"
            );
        }
    });
}

/// SQLite asks for sizes as `int`, never negative.
fn bytes(n: c_int) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// A size back to SQLite, which asks for blocks far below `int`'s limit.
fn int(n: usize) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

// SAFETY (the memory methods below): SQLite calls them only with pointers they returned;
// mimalloc's blocks are aligned to 16 bytes, SQLite needs 8.

unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
    unsafe { mi::mi_malloc(bytes(n)) }
}

unsafe extern "C" fn free(p: *mut c_void) {
    unsafe { mi::mi_free(p) }
}

unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    unsafe { mi::mi_realloc(p, bytes(n)) }
}

unsafe extern "C" fn size(p: *mut c_void) -> c_int {
    int(unsafe { mi::mi_usable_size(p) })
}

unsafe extern "C" fn roundup(n: c_int) -> c_int {
    int(unsafe { mi::mi_good_size(bytes(n)) })
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    sqlite::SQLITE_OK
}

unsafe extern "C" fn shutdown(_: *mut c_void) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_allocates_from_mimalloc_once_configured() {
        sqlite_allocates_from_mimalloc();
        // SAFETY: an allocation through SQLite's own API, freed by it.
        unsafe {
            let p = sqlite::sqlite3_malloc(1000);
            assert!(!p.is_null());
            assert!(
                mi::mi_is_in_heap_region(p),
                "SQLite's block is not mimalloc's"
            );
            assert!(sqlite::sqlite3_msize(p) >= 1000);
            sqlite::sqlite3_free(p);
        }
    }
}
