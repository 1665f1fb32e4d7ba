//! The bridge from the runtime's configuration to the reference's parameters. Kept apart so
//! the reference itself never sees a runtime type.

use riffle_runtime::config::DataflowConfig;
use riffle_runtime::event::{Event, EventType};

use super::{RefEvent, RefParams, RefType};

/// A runtime event as the reference reads it, from input partition `partition`.
pub fn ref_event(e: &Event, partition: u32) -> RefEvent {
    RefEvent {
        partition,
        event_id: e.event_id.to_string(),
        user_id: e.user_id.to_string(),
        item_id: e.item_id.to_string(),
        kind: match e.kind {
            EventType::View => RefType::View,
            EventType::Click => RefType::Click,
            EventType::Cart => RefType::Cart,
            EventType::Purchase => RefType::Purchase,
        },
        ts: e.ts,
    }
}

/// The reference's parameters for a runtime dataflow configuration.
pub fn ref_params(df: &DataflowConfig) -> RefParams {
    RefParams {
        weights: [
            u64::from(df.weights.view),
            u64::from(df.weights.click),
            u64::from(df.weights.cart),
            u64::from(df.weights.purchase),
        ],
        history_length: df.history_length,
        session_gap_ms: df.session_gap.0,
        window_size_ms: df.window_size.0,
        window_slide_ms: df.window_slide.0,
        max_out_of_orderness_ms: df.max_out_of_orderness.0,
        allowed_lateness_ms: df.allowed_lateness.0,
        neighbor_limit: df.neighbor_limit,
        top_k: df.top_k,
        exclude_purchased: df.exclude_purchased,
    }
}
