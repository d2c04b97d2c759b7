//! The bidirectional Consume stream. The client opens it with a start frame
//! and then sends acks, nacks, lease extensions and rejections; the server
//! pushes messages as they are committed (woken by the subject's watcher, no
//! polling) or become due for redelivery, never with more than
//! `max_in_flight` of them outstanding — sent and neither acked, nacked nor
//! past their lease. Acks are not answered one call each: they ride along
//! with the next lease (one transaction, one WAL write), waiting at most
//! `ACK_LINGER` for it. When the stream ends, its acks are applied and its
//! leases given back for immediate redelivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use mts_proto::pb::consume_request::Request as Frame;
use mts_proto::pb::{ConsumeRequest, ConsumeStart, Message, NotHeldSequences};
use mts_runtime::auth::{Caller, Permission};
use mts_runtime::validate;
use mts_storage::store::{Leased, NotHeld};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use crate::Error;
use crate::delivery::Payloads;
use crate::delivery::wire_messages;
use crate::handlers::{Egress, draining_status, in_use_ticks, touch};
use crate::rules::{MAX_SEQUENCES, consumer_names, extension, reject_reason, sequence_list};

/// `max_in_flight` when the client gives 0.
const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
/// Highest `max_in_flight`.
const MAX_IN_FLIGHT: u32 = 10_000;
/// How long a busy stream's lease call waits in Tarantool for the next
/// commit, so that its next messages come back on that call instead of
/// after a wake-up by the subject's watcher and a call of their own. The
/// stream's frames wait meanwhile (acks ride along with the next call; a nack,
/// a draining server or a client that left is seen at most this late).
const HOT_WAIT: Duration = Duration::from_millis(50);
/// How long received acks may wait for the next lease to carry them. A busy
/// stream's acks always find one; a quiet stream's cost one call at most
/// this often. Bounds how late an ack frees room under `max_ack_pending`.
const ACK_LINGER: Duration = Duration::from_millis(5);

/// Room above which a stream leases in halves, the second while the first
/// goes out.
const SPLIT_ABOVE: usize = 512;

/// Reads the start frame, checks it and starts the stream's task; returns
/// the messages it sends.
pub async fn open(
    egress: Egress,
    caller: Caller,
    mut inbound: Streaming<ConsumeRequest>,
) -> Result<impl futures::Stream<Item = Result<Message, Status>> + Send + use<>, Status> {
    let start = match inbound.next().await {
        Some(Ok(ConsumeRequest {
            request: Some(Frame::Start(start)),
        })) => start,
        Some(Ok(_)) => {
            return Err(Error::from(validate::Error::new(
                "start",
                "the first frame of a Consume stream must be a start frame",
            ))
            .into());
        }
        Some(Err(status)) => return Err(status),
        None => {
            return Err(Error::from(validate::Error::new(
                "start",
                "the stream closed before its start frame",
            ))
            .into());
        }
    };
    // Receiving needs fetch; settling what was received needs ack.
    for permission in [Permission::Fetch, Permission::Ack] {
        caller
            .authorize(permission, &start.subject)
            .map_err(Error::from)?;
    }
    let max_in_flight = checked_start(&start).map_err(Error::from)?;
    let (sender, receiver) = mpsc::channel(max_in_flight as usize + 1);
    let payloads = Payloads {
        limits: egress.payload_limits,
        omit_large: start.omit_large_payloads,
    };
    // Payloads sent whole above the omission threshold pass one at a time:
    // the next waits until the client's stream has taken the one before.
    let large_gate = Arc::new(tokio::sync::Semaphore::new(1));
    let taken = Arc::clone(&large_gate);
    let omit_above = payloads.limits.omit_above;
    let session = Session {
        payloads,
        large_gate,
        _open: egress.metrics.stream_opened("consume"),
        egress,
        subject: start.subject,
        durable: start.durable_name,
        max_in_flight: max_in_flight as usize,
        report_not_held: start.report_not_held,
        outstanding: HashMap::new(),
        acks: Vec::new(),
        acks_since: None,
        ahead: None,
        sender,
    };
    tokio::spawn(session.run(inbound));
    Ok(
        tokio_stream::wrappers::ReceiverStream::new(receiver).inspect(move |item| {
            if let Ok(message) = item
                && message.data.len() as u64 > omit_above
            {
                taken.add_permits(1);
            }
        }),
    )
}

fn checked_start(start: &ConsumeStart) -> Result<u32, validate::Error> {
    consumer_names(&start.subject, &start.durable_name)?;
    match start.max_in_flight {
        0 => Ok(DEFAULT_MAX_IN_FLIGHT),
        n if n > MAX_IN_FLIGHT => Err(validate::Error::new(
            "max_in_flight",
            format!("{n} is above the limit of {MAX_IN_FLIGHT}"),
        )),
        n => Ok(n),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The monotonic instant of a wall-clock deadline.
fn instant_of(deadline_ns: u64) -> Instant {
    Instant::now() + Duration::from_nanos(deadline_ns.saturating_sub(now_ns()))
}

/// Why a session ends.
enum End {
    /// The client went away or finished; nothing to send.
    Quiet,
    /// End the stream with this status.
    With(Status),
}

/// How a session learns that there may be messages to lease.
enum Mode {
    /// Quiet: the subject's watcher wakes it on a commit or a release (a
    /// message of the subject deliverable again, whichever stream or process
    /// let it go). `look` says whether to ask Tarantool: set by either, a
    /// timer (a redelivery or lease end falls due, or acks waited long
    /// enough), a nack or a push that filled all the room; an ack alone
    /// frees room but brings nothing new, so it waits for one of those to
    /// carry it.
    Watching {
        commits: tokio::sync::watch::Receiver<crate::notify::Signal>,
        look: bool,
    },
    /// Busy: each lease call waits in Tarantool (up to `HOT_WAIT`) for the
    /// next commit and always looks; holds one of the process's
    /// `max_hot_streams` permits.
    Busy {
        _permit: tokio::sync::OwnedSemaphorePermit,
    },
}

impl Mode {
    /// Whether to ask Tarantool for messages now.
    fn looks(&self) -> bool {
        match self {
            Self::Watching { look, .. } => *look,
            Self::Busy { .. } => true,
        }
    }

    /// Something may be waiting: look on the next turn.
    fn look(&mut self) {
        if let Self::Watching { look, .. } = self {
            *look = true;
        }
    }

    /// The next commit on the subject while watching; never while busy.
    async fn commit(&mut self) -> Result<(), tokio::sync::watch::error::RecvError> {
        match self {
            Self::Watching { commits, .. } => commits.changed().await,
            Self::Busy { .. } => std::future::pending().await,
        }
    }
}

/// Ends the stream with `err`'s status.
fn ended(err: impl Into<Error>) -> End {
    End::With(err.into().into())
}

struct Session {
    _open: mts_runtime::metrics::StreamGuard,
    egress: Egress,
    /// How payloads go out on this stream.
    payloads: Payloads,
    /// Taken before sending a large payload whole; given back when the
    /// client's stream takes it.
    large_gate: Arc<tokio::sync::Semaphore>,
    subject: String,
    durable: String,
    max_in_flight: usize,
    /// Whether the client takes result frames for frames naming sequences
    /// this stream does not hold.
    report_not_held: bool,
    /// Sent and not yet acked or nacked: sequence → lease deadline (ns).
    outstanding: HashMap<u64, u64>,
    /// Acked by the client and not yet applied.
    acks: Vec<u64>,
    /// When the oldest of `acks` arrived.
    acks_since: Option<Instant>,
    /// A batch leased while the one before it went out, to send next (its
    /// messages are in `outstanding` already).
    ahead: Option<Lease>,
    sender: mpsc::Sender<Result<Message, Status>>,
}

/// Messages leased by one call, ready to send.
struct Lease {
    messages: Vec<Leased>,
    /// Acks that rode with the call for sequences the consumer no longer
    /// held: left out.
    not_held: Vec<u64>,
    /// When redeliveries can next be due.
    due: Option<Instant>,
    /// The call handed out all it was allowed: more are likely waiting.
    full: bool,
}

/// Sends `leased` down the stream, payloads read as they go; one large
/// payload sent whole at a time.
async fn send_all(
    sender: &mpsc::Sender<Result<Message, Status>>,
    large_gate: &tokio::sync::Semaphore,
    object_store: mts_storage::object_store::ObjectStore,
    leased: Vec<Leased>,
    payloads: Payloads,
) -> Result<(), End> {
    let mut messages = std::pin::pin!(wire_messages(object_store, leased, payloads));
    while let Some(message) = messages.next().await {
        match message {
            Ok(message) => {
                if message.data.len() as u64 > payloads.limits.omit_above {
                    // A client that left never takes the one before.
                    tokio::select! {
                        permit = large_gate.acquire() => match permit {
                            Ok(permit) => permit.forget(),
                            Err(_) => return Err(End::Quiet),
                        },
                        () = sender.closed() => return Err(End::Quiet),
                    }
                }
                if sender.send(Ok(message)).await.is_err() {
                    return Err(End::Quiet);
                }
            }
            Err(err) => {
                tracing::warn!(%err, "consume failed mid-batch");
                return Err(ended(err));
            }
        }
    }
    Ok(())
}

/// Applies `acks`, leases up to `room` messages of the consumer (waiting up
/// to `wait` for some) and reads those in segments.
async fn lease(
    egress: &Egress,
    subject: &str,
    durable: &str,
    acks: &[u64],
    room: usize,
    wait: Duration,
) -> Result<Lease, End> {
    let limit = u32::try_from(room).unwrap_or(u32::MAX);
    let batch = egress
        .store
        .consume(subject, durable, acks, limit, wait)
        .await
        .map_err(ended)?;
    let due = (batch.next_deadline_ns > 0).then(|| instant_of(batch.next_deadline_ns));
    let full = batch.messages.len() >= room;
    let messages = egress.ready(durable, batch.messages).await.map_err(ended)?;
    Ok(Lease {
        messages,
        not_held: batch.not_held,
        due,
        full,
    })
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<ConsumeRequest>) {
        let end = self.serve(&mut inbound).await;
        // What the client acked before it left is acked.
        if let Err(End::With(status)) = self.flush_acks().await {
            tracing::debug!(%status, "acks left at the end of a stream were not applied");
        }
        if let End::With(status) = end {
            let _ = self.sender.send(Err(status)).await;
        }
        let held: Vec<u64> = self.outstanding.keys().copied().collect();
        if !held.is_empty()
            && let Err(err) = self
                .egress
                .store
                .release(&self.subject, &self.durable, &held)
                .await
        {
            tracing::debug!(%err, "could not release leases; they expire instead");
        }
    }

    async fn serve(&mut self, inbound: &mut Streaming<ConsumeRequest>) -> End {
        let mut mode = self.watching();
        let mut draining = self.egress.draining.clone();
        let mut redelivery_due: Option<Instant> = None;
        // A busy stream's lease calls record the consumer's use themselves.
        let mut in_use = in_use_ticks();
        loop {
            // A lease that ran out is no longer this stream's to count.
            let now = now_ns();
            self.outstanding.retain(|_, deadline| *deadline > now);
            let room = self.max_in_flight.saturating_sub(self.outstanding.len());
            if room == 0 && matches!(mode, Mode::Busy { .. }) {
                // A full stream waits for its client, not for commits: it
                // gives its permit back and watches again.
                mode = self.watching();
            }
            if (room > 0 && mode.looks()) || self.ahead.is_some() {
                let wait = match mode {
                    Mode::Busy { .. } => HOT_WAIT,
                    Mode::Watching { .. } => Duration::ZERO,
                };
                let (sent, due) = match self.push(room, wait).await {
                    Ok(pushed) => pushed,
                    Err(end) => return end,
                };
                redelivery_due = due;
                mode = match mode {
                    Mode::Watching { commits, .. } if sent > 0 => {
                        match Arc::clone(&self.egress.hot_streams).try_acquire_owned() {
                            Ok(permit) => Mode::Busy { _permit: permit },
                            Err(_) => Mode::Watching {
                                commits,
                                look: sent == room,
                            },
                        }
                    }
                    Mode::Watching { commits, .. } => Mode::Watching {
                        commits,
                        look: false,
                    },
                    // Quiet for a whole wait: back to the watcher, and one
                    // more look, as a commit may have come before it watches.
                    Mode::Busy { .. } if sent == 0 => {
                        mode = self.watching();
                        continue;
                    }
                    busy @ Mode::Busy { .. } => busy,
                };
                if let Mode::Busy { .. } = mode {
                    // What the client sent meanwhile, then the next wait.
                    if let Err(end) = self.answer_waiting(inbound).await {
                        return end;
                    }
                    if self.sender.is_closed() {
                        return End::Quiet;
                    }
                    if *draining.borrow() {
                        return End::With(draining_status());
                    }
                    continue;
                }
                // Room left, or a batch leased ahead to send: go on.
                if sent == room || self.ahead.is_some() {
                    continue;
                }
            }
            // Acks that found no lease to join in time go on their own.
            if self
                .acks_since
                .is_some_and(|since| since.elapsed() >= ACK_LINGER)
                && let Err(end) = self.flush_acks().await
            {
                return end;
            }
            let lease_ends = self.outstanding.values().min().map(|d| instant_of(*d));
            let acks_due = self.acks_since.map(|since| since + ACK_LINGER);
            let wake = [redelivery_due, lease_ends, acks_due]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                _ = in_use.tick() => touch(&self.egress.store, &self.subject, &self.durable),
                frame = inbound.next() => match frame {
                    Some(Ok(ConsumeRequest { request: Some(frame) })) => {
                        match self.answer_ready(frame, inbound).await {
                            Ok(true) => mode.look(),
                            Ok(false) => {}
                            Err(end) => return end,
                        }
                    }
                    Some(Ok(ConsumeRequest { request: None })) => {}
                    // The client finished sending, or went away.
                    None | Some(Err(_)) => return End::Quiet,
                },
                changed = mode.commit() => {
                    if changed.is_err() {
                        return End::With(Status::unavailable("notifications stopped; reconnect"));
                    }
                    mode.look();
                }
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => mode.look(),
                () = self.sender.closed() => return End::Quiet,
                () = async { let _ = draining.wait_for(|draining| *draining).await; } => {
                    return End::With(draining_status());
                }
            }
        }
    }

    /// Watching the subject's commits, looking once first (a commit may have
    /// come before the watch began).
    fn watching(&self) -> Mode {
        Mode::Watching {
            commits: self.egress.watchers.watch(&self.subject, 0),
            look: true,
        }
    }

    /// Sends the batch leased ahead, or else applies the waiting acks,
    /// leases up to `room` messages (waiting up to `wait` for some) and sends
    /// them. A batch that took all the room it had says more are waiting
    /// (a backlog, a replay): the next batch is leased, and read from the
    /// object store, while this one goes out. Returns how many were sent
    /// and when redeliveries can next be due.
    async fn push(&mut self, room: usize, wait: Duration) -> Result<(usize, Option<Instant>), End> {
        let batch = match self.ahead.take() {
            Some(batch) => batch,
            None => {
                let acks = self.take_acks();
                // Half of a large room now, so that the rest is leased (and
                // read) while these go out.
                let limit = if room > SPLIT_ABOVE { room / 2 } else { room };
                let mut batch = lease(
                    &self.egress,
                    &self.subject,
                    &self.durable,
                    &acks,
                    limit,
                    wait,
                )
                .await?;
                self.hold(&batch.messages);
                self.report("ack", std::mem::take(&mut batch.not_held))
                    .await?;
                batch
            }
        };
        let (sent, due) = (batch.messages.len(), batch.due);
        let room_after = self.max_in_flight.saturating_sub(self.outstanding.len());
        let next = async {
            if !batch.full || room_after == 0 {
                return None;
            }
            let (egress, subject, durable) = (&self.egress, &self.subject, &self.durable);
            Some(lease(egress, subject, durable, &[], room_after, Duration::ZERO).await)
        };
        let out = send_all(
            &self.sender,
            &self.large_gate,
            self.egress.object_store.clone(),
            batch.messages,
            self.payloads,
        );
        let (out, next) = tokio::join!(out, next);
        match next {
            Some(Ok(next)) if !next.messages.is_empty() => {
                // Held before anything else can end the stream, so that an
                // end gives them back.
                self.hold(&next.messages);
                self.ahead = Some(next);
            }
            Some(Err(end)) => return Err(end),
            Some(Ok(_)) | None => {}
        }
        out?;
        Ok((sent, due))
    }

    /// Counts `messages` as handed out on this stream.
    fn hold(&mut self, messages: &[Leased]) {
        self.egress.count_deliveries(messages);
        for leased in messages {
            self.outstanding
                .insert(leased.message.seq, leased.deadline_ns);
        }
    }

    /// Takes `frame` and every frame already waiting behind it, so that the
    /// acks of a burst go to Tarantool together. True when one of them
    /// handed messages back.
    async fn answer_ready(
        &mut self,
        frame: Frame,
        inbound: &mut Streaming<ConsumeRequest>,
    ) -> Result<bool, End> {
        let released = self.answer(frame).await?;
        Ok(self.answer_waiting(inbound).await? | released)
    }

    /// Takes the frames already waiting, up to one lease's worth so that a
    /// flood cannot starve pushes. True when one of them handed messages
    /// back; ends the stream when the client finished or went away.
    async fn answer_waiting(
        &mut self,
        inbound: &mut Streaming<ConsumeRequest>,
    ) -> Result<bool, End> {
        use futures::FutureExt;
        let mut released = false;
        for _ in 0..self.max_in_flight {
            match inbound.next().now_or_never() {
                Some(Some(Ok(ConsumeRequest {
                    request: Some(frame),
                }))) => released |= self.answer(frame).await?,
                Some(Some(Ok(ConsumeRequest { request: None }))) => {}
                Some(None | Some(Err(_))) => return Err(End::Quiet),
                None => break,
            }
        }
        Ok(released)
    }

    /// Takes an ack, nack, extension or rejection frame. Acks are kept for
    /// the next lease (room they free counts at once); the others are
    /// applied now, a nack or rejection after the acks before it. True when
    /// the frame made room or handed messages back, so there may be
    /// something to push.
    async fn answer(&mut self, frame: Frame) -> Result<bool, End> {
        match frame {
            Frame::Ack(ack) => {
                sequence_list(&ack.sequences).map_err(ended)?;
                let (held, not_held) = self.split(ack.sequences);
                if self.acks.len() + held.len() > MAX_SEQUENCES {
                    self.flush_acks().await?;
                }
                for seq in &held {
                    self.outstanding.remove(seq);
                }
                if !held.is_empty() {
                    self.acks.extend(held);
                    self.acks_since.get_or_insert_with(Instant::now);
                }
                self.report("ack", not_held).await?;
                Ok(false)
            }
            Frame::Nack(nack) => {
                sequence_list(&nack.sequences).map_err(ended)?;
                self.flush_acks().await?;
                let (store, subject, durable) = (&self.egress.store, &self.subject, &self.durable);
                let (gone, _) = self
                    .apply("nack", nack.sequences, |seqs| async move {
                        store.nack(subject, durable, &seqs, nack.delay_ms).await
                    })
                    .await?;
                for seq in &gone {
                    self.outstanding.remove(seq);
                }
                Ok(true)
            }
            Frame::Extend(extend) => {
                sequence_list(&extend.sequences).map_err(ended)?;
                let extend_ms = extension(extend.extend_ms).map_err(ended)?;
                let (store, subject, durable) = (&self.egress.store, &self.subject, &self.durable);
                let (extended, deadline) = self
                    .apply("extend", extend.sequences, |seqs| async move {
                        store
                            .extend_leases(subject, durable, &seqs, extend_ms)
                            .await
                    })
                    .await?;
                if let Some(deadline) = deadline {
                    for seq in &extended {
                        if let Some(lease_end) = self.outstanding.get_mut(seq) {
                            *lease_end = deadline;
                        }
                    }
                }
                Ok(false)
            }
            Frame::Reject(reject) => {
                sequence_list(&reject.sequences).map_err(ended)?;
                reject_reason(&reject.reason).map_err(ended)?;
                self.flush_acks().await?;
                let (egress, subject, durable, reason) =
                    (&self.egress, &self.subject, &self.durable, &reject.reason);
                let (gone, _) = self
                    .apply("reject", reject.sequences, |seqs| async move {
                        egress.reject_held(subject, durable, &seqs, reason).await
                    })
                    .await?;
                for seq in &gone {
                    self.outstanding.remove(seq);
                }
                Ok(true)
            }
            Frame::Start(_) => Err(ended(validate::Error::new(
                "start",
                "a stream takes one start frame",
            ))),
        }
    }

    /// `seqs` split into those this stream holds and the rest.
    fn split(&self, seqs: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
        seqs.into_iter()
            .partition(|seq| self.outstanding.contains_key(seq))
    }

    /// Applies `call` to the sequences of a `frame` this stream holds; those
    /// it does not hold, and any the consumer turns out not to hold either
    /// (a lease that ran out meanwhile), are left out and reported. Returns
    /// the sequences it applied to and what the call answered, if it was made.
    async fn apply<F, Fut, T, E>(
        &self,
        frame: &str,
        seqs: Vec<u64>,
        call: F,
    ) -> Result<(Vec<u64>, Option<T>), End>
    where
        F: Fn(Vec<u64>) -> Fut,
        Fut: Future<Output = Result<Result<T, NotHeld>, E>>,
        E: Into<Error>,
    {
        let (held, not_held) = self.split(seqs);
        self.apply_held(frame, held, not_held, call).await
    }

    /// `apply` for sequences already split into `held` and `not_held`.
    async fn apply_held<F, Fut, T, E>(
        &self,
        frame: &str,
        mut held: Vec<u64>,
        mut not_held: Vec<u64>,
        call: F,
    ) -> Result<(Vec<u64>, Option<T>), End>
    where
        F: Fn(Vec<u64>) -> Fut,
        Fut: Future<Output = Result<Result<T, NotHeld>, E>>,
        E: Into<Error>,
    {
        let (mut applied, mut answer) = (Vec::new(), None);
        // Once more without those the consumer did not hold after all.
        for _ in 0..2 {
            if held.is_empty() {
                break;
            }
            match call(held.clone()).await.map_err(ended)? {
                Ok(value) => {
                    applied = std::mem::take(&mut held);
                    answer = Some(value);
                    break;
                }
                Err(NotHeld(missing)) => {
                    held.retain(|seq| !missing.contains(seq));
                    not_held.extend(missing);
                }
            }
        }
        not_held.extend(held);
        self.report(frame, not_held).await?;
        Ok((applied, answer))
    }

    /// Tells the client, when it asked, that its `frame` named `seqs`,
    /// which this stream does not hold: nothing changed for them.
    async fn report(&self, frame: &str, seqs: Vec<u64>) -> Result<(), End> {
        if seqs.is_empty() {
            return Ok(());
        }
        tracing::debug!(
            frame,
            ?seqs,
            "a Consume frame named sequences the stream does not hold"
        );
        if !self.report_not_held {
            return Ok(());
        }
        let result = Message {
            not_held: Some(NotHeldSequences {
                frame: frame.to_owned(),
                sequences: seqs,
            }),
            ..Message::default()
        };
        self.sender.send(Ok(result)).await.map_err(|_| End::Quiet)
    }

    /// The waiting acks, leaving none.
    fn take_acks(&mut self) -> Vec<u64> {
        self.acks_since = None;
        std::mem::take(&mut self.acks)
    }

    /// Applies the waiting acks on their own.
    async fn flush_acks(&mut self) -> Result<(), End> {
        let acks = self.take_acks();
        if acks.is_empty() {
            return Ok(());
        }
        // Taken off `outstanding` when they came: held by this stream then.
        let (store, subject, durable) = (&self.egress.store, &self.subject, &self.durable);
        self.apply_held("ack", acks, Vec::new(), |seqs| async move {
            store.ack_sequences(subject, durable, &seqs).await
        })
        .await
        .map(drop)
    }
}
