//! The admin API: server-side jobs (scrub, device replacement) that report
//! progress and end with a report. `storagectl`, the benches and tests use
//! it rather than the generated client, so the calls, their arguments and
//! the end of a job without a report are handled in one place.
//!
//! Neither job is retried: a scrub or a replacement interrupted by a
//! restart is resumed by calling it again, which the operator decides.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use storaged_proto::pb;

use crate::{Client, ClientError};

/// One event of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent<R> {
    /// Bytes of the job done so far, of `total`.
    Progress { done: u64, total: u64 },
    /// The job's outcome (its last event).
    Report(R),
}

/// A job's events as they arrive (`None`: an event this client does not
/// know).
type Events<R> = Pin<Box<dyn Stream<Item = Result<Option<JobEvent<R>>, ClientError>> + Send>>;

/// A server-side job under way; its events arrive as the server sends them.
pub struct Job<R> {
    what: &'static str,
    events: Events<R>,
}

impl<R> std::fmt::Debug for Job<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("what", &self.what).finish()
    }
}

impl<R: Send + 'static> Job<R> {
    fn new<E: Send + 'static>(
        what: &'static str,
        stream: tonic::Streaming<E>,
        split: fn(E) -> Option<JobEvent<R>>,
    ) -> Self {
        let events = stream.map(move |r| r.map(split).map_err(ClientError::from));
        Self {
            what,
            events: Box::pin(events),
        }
    }

    /// The next event; `None` once the server has ended the job.
    pub async fn next(&mut self) -> Option<Result<JobEvent<R>, ClientError>> {
        loop {
            match self.events.next().await? {
                // An event of a kind this client does not know: skipped.
                Ok(None) => continue,
                Ok(Some(ev)) => return Some(Ok(ev)),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Follows the job to its end, calling `progress(done, total)` on the
    /// way, and returns its report (an error if the server ended it
    /// without one).
    pub async fn report(mut self, mut progress: impl FnMut(u64, u64)) -> Result<R, ClientError> {
        let mut report = None;
        while let Some(ev) = self.next().await {
            match ev? {
                JobEvent::Progress { done, total } => progress(done, total),
                JobEvent::Report(r) => report = Some(r),
            }
        }
        report.ok_or_else(|| {
            ClientError::Protocol(format!(
                "the server ended the {} without a report",
                self.what
            ))
        })
    }
}

/// How a device replacement may proceed (see `storagectl device replace`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplaceOptions {
    /// Replace a device that is still there (its data is unreadable until
    /// the rebuild ends).
    pub allow_healthy: bool,
    /// Use a new device that holds a superblock of some pool.
    pub overwrite: bool,
}

impl Client {
    /// Starts a scrub of `dataset` (every dataset when `None`) at
    /// `rate_mib_s` (0: the server's default).
    pub async fn scrub(
        &self,
        dataset: Option<&str>,
        rate_mib_s: u64,
    ) -> Result<Job<pb::ScrubReport>, ClientError> {
        use pb::scrub_event::Event;
        let stream = self
            .raw()
            .scrub(pb::ScrubRequest {
                dataset: dataset.unwrap_or_default().to_owned(),
                rate_mib_s,
            })
            .await?
            .into_inner();
        Ok(Job::new("scrub", stream, |ev: pb::ScrubEvent| {
            match ev.event? {
                Event::Progress(p) => Some(JobEvent::Progress {
                    done: p.bytes_done,
                    total: p.bytes_total,
                }),
                Event::Report(r) => Some(JobEvent::Report(r)),
            }
        }))
    }

    /// Starts rebuilding device `old` (its index or path) onto `new_path`,
    /// a path on the server's host. A replacement that was interrupted is
    /// resumed by the same call.
    pub async fn replace_device(
        &self,
        old: &str,
        new_path: &str,
        options: ReplaceOptions,
    ) -> Result<Job<pb::ReplaceReport>, ClientError> {
        use pb::replace_device_event::Event;
        let stream = self
            .raw()
            .replace_device(pb::ReplaceDeviceRequest {
                old: old.to_owned(),
                new_path: new_path.to_owned(),
                allow_healthy: options.allow_healthy,
                overwrite: options.overwrite,
            })
            .await?
            .into_inner();
        Ok(Job::new(
            "device replacement",
            stream,
            |ev: pb::ReplaceDeviceEvent| match ev.event? {
                Event::Progress(p) => Some(JobEvent::Progress {
                    done: p.bytes_done,
                    total: p.bytes_total,
                }),
                Event::Report(r) => Some(JobEvent::Report(r)),
            },
        ))
    }
}
