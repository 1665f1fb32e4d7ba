//! The bridge from the runtime's configuration to the reference's parameters. Kept apart so
//! the reference itself never sees a runtime type.

use riffle_runtime::config::DataflowConfig;

use super::RefParams;

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
