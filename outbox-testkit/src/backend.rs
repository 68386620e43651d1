//! Which real backends the tests may use: `OUTBOX_TEST_<BACKEND>_URL`, else (feature
//! `containers`) testcontainers when a Docker socket exists, else a loud skip — unless
//! `OUTBOX_TEST_REQUIRE` names the backend (or `all`), in which case the test fails.

/// Whether `OUTBOX_TEST_REQUIRE` (a comma-separated list, or `all`) names `backend`.
pub fn required(backend: &str) -> bool {
    std::env::var("OUTBOX_TEST_REQUIRE").is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|b| b.eq_ignore_ascii_case(backend) || b.eq_ignore_ascii_case("all"))
    })
}

/// The environment variable holding `backend`'s URL: `OUTBOX_TEST_POSTGRES_URL` for
/// `"postgres"`.
pub fn url_var(backend: &str) -> String {
    format!("OUTBOX_TEST_{}_URL", backend.to_ascii_uppercase())
}

/// The URL to test `backend` against, from `OUTBOX_TEST_<BACKEND>_URL`. Without it: panics if
/// the backend is required, else prints a loud skip notice to stderr and returns `None`.
///
/// ```
/// // In an adapter's test:
/// let Some(url) = outbox_testkit::backend::url_or_skip("postgres") else { return };
/// # let _ = url;
/// ```
pub fn url_or_skip(backend: &str) -> Option<String> {
    let var = url_var(backend);
    match std::env::var(&var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if required(backend) {
                panic!(
                    "{backend} is required (OUTBOX_TEST_REQUIRE) but {var} is not set: \
                     point it at a running server"
                );
            }
            loud(&format!(
                "{backend} tests did not run: set {var} (or OUTBOX_TEST_REQUIRE={backend} to make this an error)"
            ));
            None
        }
    }
}

/// Panic with a clear message if a required backend is unreachable; otherwise print a loud
/// skip notice and return `None`. Use after a connection attempt failed.
pub fn unreachable_or_skip<E: std::fmt::Display>(backend: &str, url: &str, error: E) -> Option<()> {
    if required(backend) {
        panic!("{backend} is required (OUTBOX_TEST_REQUIRE) but {url} is unreachable: {error}");
    }
    loud(&format!("{backend} at {url} is unreachable: {error}"));
    None
}

/// Print a skip notice straight to the process's stderr: the test harness captures
/// `eprintln!`, and a skip must be seen.
fn loud(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {what} ***\n");
}
