//! Coverage-guided fuzzing of the event decoders: never panic; every rejection has a reason;
//! every accepted event satisfies the validation rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use riffle_runtime::event::{parse_json, parse_session_tsv, Validation};

fuzz_target!(|data: &[u8]| {
    let v = Validation { max_ts: 2_000_000_000_000 };
    for result in [parse_json(data, &v), parse_session_tsv(data, 2, &v)] {
        match result {
            Ok(ev) => {
                assert!(ev.ts > 0 && ev.ts <= v.max_ts);
                assert!(!ev.event_id.is_empty() && !ev.user_id.is_empty() && !ev.item_id.is_empty());
            }
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
});
