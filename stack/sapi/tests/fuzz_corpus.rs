//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the fuzz targets
//! run, so every input a fuzzer ever kept stays a regression test on stable Rust.

use std::path::Path;

use shunt_sapi::decode_check;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()));
    let mut replayed = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(outcome.is_ok(), "{} fails its check", path.display());
        replayed += 1;
    }
    // A corpus that silently vanished would make this test pass vacuously.
    assert!(
        replayed >= 20,
        "only {replayed} inputs in {}",
        dir.display()
    );
}

#[test]
fn request_corpus() {
    replay("request", decode_check::request);
}

#[test]
fn daemon_reply_corpus() {
    replay("daemon_reply", decode_check::daemon_reply);
}

#[test]
fn event_corpus() {
    replay("event", decode_check::event);
}
