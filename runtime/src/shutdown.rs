//! SIGTERM / SIGINT as a flag: the processing loops check it between records and stop
//! cleanly (a worker commits what it has; Kubernetes sends SIGTERM before deleting a pod).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// A flag that turns true on the first SIGTERM or SIGINT. The handlers are installed before
/// this returns, so no signal slips through to the default action (termination).
pub fn on_termination() -> std::io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut interrupt, mut terminate) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::Builder::new()
        .name("riffle-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            });
            tracing::info!("termination signal: stopping");
            set.store(true, Relaxed);
        })?;
    Ok(flag)
}
