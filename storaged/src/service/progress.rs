//! Long operations (scrub, device replacement) as streams of progress
//! events, and what happens to them when their caller goes away or its
//! deadline passes.

use super::*;

/// What happens to the work of [`with_progress`] when its caller goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnCancel {
    /// Finish it (a device rebuild: checkpointed, and worth finishing).
    Finish,
    /// Stop it (a scrub: cancelling it is how an operator stops it).
    Stop,
}

/// Runs `work` on a task of its own and streams its progress (at most
/// every 200 ms, dropped when nobody listens) and then its final event or
/// error. `on_cancel` says whether the work outlives its caller, and so
/// whether it stops or goes on when the caller's `deadline` passes (the
/// caller gets DEADLINE_EXCEEDED either way).
pub(super) fn with_progress<E, Fut>(
    on_cancel: OnCancel,
    deadline: Option<tokio::time::Instant>,
    progress_event: impl Fn(u64, u64) -> E + Send + 'static,
    work: impl FnOnce(Box<dyn FnMut(u64, u64) + Send>) -> Fut + Send + 'static,
) -> BoxStream<E>
where
    E: Send + 'static,
    Fut: std::future::Future<Output = Result<E, Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let ptx = tx.clone();
    let mut last = std::time::Instant::now();
    let progress = Box::new(move |done, total| {
        if last.elapsed() >= std::time::Duration::from_millis(200) {
            last = std::time::Instant::now();
            let _ = ptx.try_send(Ok(progress_event(done, total)));
        }
    });
    tokio::spawn(async move {
        let mut work = std::pin::pin!(work(progress));
        let passed = || {
            Err(Status::deadline_exceeded(
                "the call's deadline (grpc-timeout) passed before the operation ended",
            ))
        };
        let end = match on_cancel {
            OnCancel::Finish => tokio::select! {
                end = &mut work => end,
                () = deadline_passed(deadline) => {
                    let _ = tx.send(passed()).await;
                    tracing::info!("caller's deadline passed; the operation goes on");
                    let _ = work.await;
                    return;
                }
            },
            OnCancel::Stop => tokio::select! {
                end = &mut work => end,
                () = tx.closed() => {
                    tracing::info!("caller went away; stopping");
                    return;
                }
                () = deadline_passed(deadline) => {
                    tracing::info!("caller's deadline passed; stopping");
                    passed()
                }
            },
        };
        let _ = tx.send(end).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Resolves when `deadline` passes; never without one.
pub(super) async fn deadline_passed(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How a response stream whose client stopped reading ends.
pub(super) fn stalled_status<T>() -> Result<T, Status> {
    Err(Status::resource_exhausted(
        "this stream was ended: its client read nothing for stream_stall_timeout_s while storaged held buffers for it",
    ))
}
