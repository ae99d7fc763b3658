//! The test harness of the integration targets (libtest-mimic): it runs each registered
//! test like `#[tokio::test]` would, and reports a test that found a service or tool
//! missing as *ignored, with the reason* rather than as a pass. The summary names every
//! such test and why, so a run without PostgreSQL or Chromium cannot pass for a full one.
//! `DATAFLOW_TEST_REQUIRE_SERVICES=1` still turns each of them into a failure.
//!
//! A test is declared with `register!(name)` after its function (or by `backend_tests!`,
//! once per ledger); a test skips by calling [`skip`] and returning.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

pub type AsyncBody = fn() -> Pin<Box<dyn Future<Output = ()>>>;

/// How a registered test runs.
#[derive(Clone, Copy)]
pub enum Body {
    /// On a multi-threaded runtime of its own with two workers, as
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` did.
    Async(AsyncBody),
    Sync(fn()),
}

/// One registered test.
pub struct Test {
    /// `module_path!()` where it was declared.
    pub module: &'static str,
    pub name: &'static str,
    /// Ignored unless asked for (`--ignored`), with the reason.
    pub ignored: Option<&'static str>,
    pub body: Body,
}

inventory::collect!(Test);

/// Registers a test function: `register!(name)` for an `async fn name()`,
/// `register!(sync name)` for a plain `fn name()`, `register!(ignore = "why" name)` for one
/// that runs only when asked for.
macro_rules! register {
    (sync $name:ident) => {
        $crate::common::harness::submit!($name, None, $crate::common::harness::Body::Sync($name));
    };
    (ignore = $why:literal $name:ident) => {
        $crate::common::harness::submit!(
            $name,
            Some($why),
            $crate::common::harness::Body::Async(|| Box::pin($name()))
        );
    };
    ($name:ident) => {
        $crate::common::harness::submit!(
            $name,
            None,
            $crate::common::harness::Body::Async(|| Box::pin($name()))
        );
    };
}
pub(crate) use register;

macro_rules! submit {
    ($name:ident, $ignored:expr, $body:expr) => {
        inventory::submit! {
            $crate::common::harness::Test {
                module: module_path!(),
                name: stringify!($name),
                ignored: $ignored,
                body: $body,
            }
        }
    };
}
pub(crate) use submit;

thread_local! {
    /// Why the test running on this thread skipped, if it did.
    static SKIPPED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Every test that skipped, with its reason, for the summary.
static SKIPS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Marks the running test as skipped for `reason`; the test should then return. Called on
/// the test's own task (a spawned task runs on another thread, where this only logs).
pub fn skip(reason: String) {
    SKIPPED.with(|s| *s.borrow_mut() = Some(reason));
}

/// Runs every registered test of this binary and exits with libtest's code.
pub fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let mut trials: Vec<Trial> = inventory::iter::<Test>
        .into_iter()
        .map(|t| {
            // `it::imports::submit` is listed as `imports::submit`, as libtest names it.
            let module = t.module.split_once("::").map_or("", |(_, rest)| rest);
            let name = if module.is_empty() {
                t.name.to_owned()
            } else {
                format!("{module}::{}", t.name)
            };
            let body = t.body;
            let full = name.clone();
            let trial = Trial::ignorable_test(name, move || run(&full, &body));
            trial.with_ignored_flag(t.ignored.is_some())
        })
        .collect();
    trials.sort_by(|a, b| a.name().cmp(b.name()));
    let conclusion = libtest_mimic::run(&args, trials);
    let mut skips = SKIPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    skips.sort();
    if !skips.is_empty() {
        println!(
            "{} test(s) skipped at run time (reported as ignored); `bash .ci/run` installs and \
             starts what they need:",
            skips.len()
        );
        for (name, reason) in skips.iter() {
            println!("    {name}: {reason}");
        }
        println!();
    }
    conclusion.exit_code()
}

fn run(name: &str, body: &Body) -> Result<Completion, Failed> {
    SKIPPED.with(|s| s.borrow_mut().take());
    match body {
        Body::Sync(f) => f(),
        Body::Async(f) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Failed::from(format!("building the test's runtime: {e}")))?;
            runtime.block_on(f());
        }
    }
    match SKIPPED.with(|s| s.borrow_mut().take()) {
        None => Ok(Completion::Completed),
        Some(reason) => {
            SKIPS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((name.to_owned(), reason.clone()));
            Ok(Completion::ignored_with(reason))
        }
    }
}
