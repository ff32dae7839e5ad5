//! Replays the checked-in corpus of the `exchange` fuzz target
//! (`fuzz/corpus/exchange/`) through the function the target calls, on
//! stable and in every test run.

use std::fs;
use std::path::Path;

#[test]
fn exchange_corpus_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/exchange");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut replayed = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let input = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(|| ipcd::fuzzing::exchange(&input)).is_err() {
            panic!("exchange fails on {}", path.display());
        }
        replayed += 1;
    }
    assert!(replayed > 0, "the exchange corpus in {} is empty", dir.display());
}
