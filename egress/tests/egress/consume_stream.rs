//! The bidirectional Consume stream: push on commit, flow control, acks and
//! nacks on the stream, and what happens to a broken stream's messages.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use mts_proto::pb::consume_request::Request as Frame;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{
    AckSequences, ConsumeRequest, ConsumeStart, ConsumerConfig, ConsumerRequest,
    CreateOrUpdateConsumerRequest, ExtendSequences, Message, NackSequences, RejectSequences,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::{Fixture, fixture, fixture_with, sequences};

struct Stream {
    frames: mpsc::Sender<ConsumeRequest>,
    messages: Streaming<Message>,
}

impl Stream {
    async fn open(f: &mut Fixture, durable: &str, max_in_flight: u32) -> Self {
        Self::open_with(f, durable, max_in_flight, false).await
    }

    /// `report_not_held`: with result frames.
    async fn open_with(
        f: &mut Fixture,
        durable: &str,
        max_in_flight: u32,
        report_not_held: bool,
    ) -> Self {
        Self::open_on(
            &f.client,
            &f.subject,
            durable,
            max_in_flight,
            report_not_held,
        )
        .await
    }

    async fn open_on(
        client: &EgressServiceClient<Channel>,
        subject: &str,
        durable: &str,
        max_in_flight: u32,
        report_not_held: bool,
    ) -> Self {
        let (frames, outbound) = mpsc::channel(16);
        frames
            .send(ConsumeRequest {
                request: Some(Frame::Start(ConsumeStart {
                    subject: subject.into(),
                    durable_name: durable.into(),
                    max_in_flight,
                    omit_large_payloads: false,
                    report_not_held,
                })),
            })
            .await
            .unwrap();
        let messages = client
            .clone()
            .consume(ReceiverStream::new(outbound))
            .await
            .unwrap()
            .into_inner();
        Self { frames, messages }
    }

    async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.messages.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("no error")
    }

    /// Nothing more arrives for a while.
    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(400), self.messages.next())
            .await
            .is_err()
    }

    async fn ack(&self, sequences: Vec<u64>) {
        let frame = ConsumeRequest {
            request: Some(Frame::Ack(AckSequences { sequences })),
        };
        self.frames.send(frame).await.unwrap();
    }

    /// Finishes sending; the stream then ends quietly.
    async fn finish(self) {
        let Self {
            frames,
            mut messages,
        } = self;
        drop(frames);
        let end = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        assert!(matches!(end, Ok(None)), "the stream ends quietly: {end:?}");
    }

    async fn nack(&self, sequences: Vec<u64>, delay_ms: u32) {
        let frame = ConsumeRequest {
            request: Some(Frame::Nack(NackSequences {
                sequences,
                delay_ms,
            })),
        };
        self.frames.send(frame).await.unwrap();
    }
}

impl Stream {
    /// The next frame is a result frame naming `sequences` of `frame`.
    async fn not_held(&mut self, frame: &str, sequences: Vec<u64>) {
        let message = self.next().await;
        assert_eq!(message.sequence, 0, "a result frame: {message:?}");
        let not_held = message.not_held.expect("not_held set");
        assert_eq!(
            (not_held.frame.as_str(), not_held.sequences),
            (frame, sequences)
        );
    }

    async fn reject(&self, sequences: Vec<u64>, reason: &str) {
        let frame = ConsumeRequest {
            request: Some(Frame::Reject(RejectSequences {
                sequences,
                reason: reason.into(),
            })),
        };
        self.frames.send(frame).await.unwrap();
    }

    async fn extend(&self, sequences: Vec<u64>, extend_ms: u32) {
        let frame = ConsumeRequest {
            request: Some(Frame::Extend(ExtendSequences {
                sequences,
                extend_ms,
            })),
        };
        self.frames.send(frame).await.unwrap();
    }
}

async fn create(f: &mut Fixture, durable: &str, ack_wait_ms: u32) {
    f.client
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: f.subject.clone(),
            durable_name: durable.into(),
            config: Some(ConsumerConfig {
                ack_wait_ms: Some(ack_wait_ms),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn flow_control_never_exceeds_max_in_flight() {
    let mut f = fixture("consume-flow").await;
    create(&mut f, "flow", 60_000).await;
    for i in 0..30u8 {
        f.publish(&[i]).await;
    }
    let mut stream = Stream::open(&mut f, "flow", 4).await;
    let mut outstanding = HashSet::new();
    let mut received = Vec::new();
    while received.len() < 30 {
        // Take everything the server is willing to send now.
        while outstanding.len() < 4 {
            let message = stream.next().await;
            assert_eq!(message.delivery_count, 1);
            outstanding.insert(message.sequence);
            received.push(message.sequence);
            if received.len() == 30 {
                break;
            }
        }
        if received.len() < 30 {
            assert!(
                stream.quiet().await,
                "a fifth message arrived with 4 unacked"
            );
        }
        // Ack two, keep the rest outstanding.
        let mut batch: Vec<u64> = outstanding.iter().copied().collect();
        batch.sort_unstable();
        batch.truncate(2);
        for seq in &batch {
            outstanding.remove(seq);
        }
        stream.ack(batch).await;
    }
    assert_eq!(
        received,
        (1..=30).collect::<Vec<u64>>(),
        "in order, each once"
    );
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_backlog_streams_in_order_and_what_a_stream_held_comes_back_when_it_ends() {
    backlog_in_order_and_leased_ahead_comes_back(fixture("consume-ahead").await).await;
}

#[tokio::test]
async fn a_stream_waiting_for_the_watcher_sends_what_it_leased_ahead_at_once() {
    // No stream may wait in Tarantool: each is woken by the subject's
    // watcher, and with no commit to come only the batch leased ahead is
    // left to send.
    let f = fixture_with("consume-ahead-watched", |c| c.egress.max_hot_streams = 0).await;
    backlog_in_order_and_leased_ahead_comes_back(f).await;
}

async fn backlog_in_order_and_leased_ahead_comes_back(mut f: Fixture) {
    create(&mut f, "ahead", 60_000).await;
    for i in 0..1500u32 {
        f.publish(&i.to_le_bytes()).await;
    }
    // A window this large is leased in halves, the second while the first
    // goes out. The client takes the whole window before it acks anything:
    // only the stream itself can send the second half.
    // (The consumer's max_ack_pending is 1,000 by default.)
    let mut stream = Stream::open(&mut f, "ahead", 1000).await;
    for seq in 1..=1000u64 {
        let message = stream.next().await;
        assert_eq!(message.sequence, seq, "in order");
        assert_eq!(message.data[..], ((seq - 1) as u32).to_le_bytes());
    }
    assert!(stream.quiet().await, "no more than the window");
    // Room for 900 again: half of it leased at once, the rest (what is left
    // of the backlog) leased ahead, and sent without a commit or an ack to
    // wake the stream.
    stream.ack((1..=900).collect()).await;
    for seq in 1001..=1500u64 {
        assert_eq!(stream.next().await.sequence, seq, "in order");
    }
    // Ending the stream gives back what it held, 901 to 1500: they come at
    // once on the next stream, not after the minute-long lease.
    stream.finish().await;
    let mut again = Stream::open(&mut f, "ahead", 2000).await;
    for seq in 901..=1500u64 {
        assert_eq!(again.next().await.sequence, seq);
    }
    assert!(again.quiet().await);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn commits_are_pushed_and_nacks_come_back_on_the_stream() {
    let mut f = fixture("consume-push").await;
    create(&mut f, "push", 60_000).await;
    let mut stream = Stream::open(&mut f, "push", 10).await;
    assert!(stream.quiet().await, "nothing published yet");
    // The long-poll slice is 300 s: only a commit waking the waiter gets this here in time.
    f.publish(b"first").await;
    let first = stream.next().await;
    assert_eq!(
        (first.sequence, first.data.as_ref()),
        (1, b"first".as_slice())
    );

    stream.nack(vec![1], 0).await;
    let again = stream.next().await;
    assert_eq!((again.sequence, again.delivery_count), (1, 2));
    stream.ack(vec![1]).await;
    f.publish(b"second").await;
    assert_eq!(stream.next().await.sequence, 2);
    stream.ack(vec![2]).await;
    // The ack was applied: nothing left for another fetcher.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let floor = ack_floor(&mut f, "push").await;
        if floor == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks on the stream were not applied: the ack floor is {floor}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_busy_stream_that_falls_quiet_still_gets_the_next_commit() {
    let mut f = fixture("consume-hot-cold").await;
    create(&mut f, "hot", 60_000).await;
    let mut stream = Stream::open(&mut f, "hot", 10).await;
    // Busy: after a delivery the stream's lease calls wait for commits themselves.
    for seq in 1..=3u64 {
        f.publish(&[seq as u8]).await;
        assert_eq!(stream.next().await.sequence, seq);
        stream.ack(vec![seq]).await;
    }
    // Quiet for longer than a busy wait: the stream goes back to the
    // subject's watcher (whose own wait is 300 s here), which must wake it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.publish(b"after a pause").await;
    assert_eq!(stream.next().await.sequence, 4);
    stream.ack(vec![4]).await;
    assert!(stream.quiet().await, "each message once");
    f.service.stop().await.unwrap();
}

/// The consumer's ack floor, as GetConsumerInfo reports it.
async fn ack_floor(f: &mut Fixture, durable: &str) -> u64 {
    f.client
        .get_consumer_info(mts_proto::pb::ConsumerRequest {
            subject: f.subject.clone(),
            durable_name: durable.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .ack_floor
}

/// A consumer `durable` with `ack_wait_ms`, three messages published, and a
/// stream that has received all three.
async fn three_delivered(f: &mut Fixture, durable: &str, ack_wait_ms: u32) -> Stream {
    create(f, durable, ack_wait_ms).await;
    for i in 0..3u8 {
        f.publish(&[i]).await;
    }
    let mut stream = Stream::open(f, durable, 10).await;
    for seq in 1..=3 {
        assert_eq!(stream.next().await.sequence, seq);
    }
    stream
}

#[tokio::test]
async fn a_broken_streams_messages_come_back() {
    let mut f = fixture("consume-broken").await;
    let stream = three_delivered(&mut f, "broken", 2000).await;
    drop(stream);
    let back = f.fetch_within("broken", 10, Duration::from_secs(10)).await;
    assert_eq!(sequences(&back), vec![1, 2, 3]);
    assert!(back.iter().all(|m| m.delivery_count == 2), "{back:?}");
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn acks_sent_just_before_the_stream_ends_are_applied() {
    let mut f = fixture("consume-last-acks").await;
    let stream = three_delivered(&mut f, "last", 60_000).await;
    // Acks wait for a lease to carry them; the client finishes before one comes.
    stream.ack(vec![1, 2]).await;
    stream.finish().await;
    assert_eq!(ack_floor(&mut f, "last").await, 2);
    let back = f.fetch_within("last", 10, Duration::from_secs(10)).await;
    assert_eq!(sequences(&back), vec![3], "1 and 2 were acked: {back:?}");
    assert_eq!(back[0].delivery_count, 2);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_must_start_with_a_start_frame() {
    let mut f = fixture("consume-start").await;
    let (frames, outbound) = mpsc::channel(4);
    frames
        .send(ConsumeRequest {
            request: Some(Frame::Ack(AckSequences { sequences: vec![1] })),
        })
        .await
        .unwrap();
    let refused = f
        .client
        .consume(ReceiverStream::new(outbound))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("start frame"),
        "{}",
        refused.message()
    );

    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn frames_naming_sequences_the_stream_does_not_hold_change_nothing_and_the_stream_goes_on() {
    let mut f = fixture("consume-not-held").await;
    create(&mut f, "d", 60_000).await;
    f.publish(b"one").await;
    f.publish(b"two").await;
    let mut stream = Stream::open_with(&mut f, "d", 10, true).await;
    assert_eq!(stream.next().await.sequence, 1);
    assert_eq!(stream.next().await.sequence, 2);
    stream.ack(vec![1, 42]).await;
    stream.not_held("ack", vec![42]).await;
    stream.nack(vec![7], 0).await;
    stream.not_held("nack", vec![7]).await;
    stream.extend(vec![1, 2], 0).await;
    stream.not_held("extend", vec![1]).await;
    stream.reject(vec![9], "no").await;
    stream.not_held("reject", vec![9]).await;
    // The held ones applied: #1 acked, #2 still held, and nothing else came.
    stream.ack(vec![2]).await;
    assert!(stream.quiet().await);
    f.publish(b"three").await;
    assert_eq!(stream.next().await.sequence, 3);
    stream.ack(vec![3]).await;
    stream.finish().await;
    let info = f
        .client
        .get_consumer_info(ConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.ack_floor, info.num_ack_pending), (3, 0));

    // Without result frames the stream goes on all the same.
    let mut quiet = Stream::open(&mut f, "d", 10).await;
    quiet.ack(vec![1]).await;
    f.publish(b"four").await;
    assert_eq!(quiet.next().await.sequence, 4);
    quiet.ack(vec![4]).await;
    quiet.finish().await;
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_extending_a_lease_keeps_its_message_from_the_other_streams() {
    let mut f = fixture("consume-extend").await;
    create(&mut f, "slow", 300).await;
    f.publish(b"large work").await;
    let mut worker = Stream::open(&mut f, "slow", 1).await;
    assert_eq!(worker.next().await.sequence, 1);
    let mut other = Stream::open(&mut f, "slow", 10).await;
    // Five lease times, extended before each runs out: the other stream
    // gets nothing meanwhile, and the worker nothing again.
    for _ in 0..10 {
        worker.extend(vec![1], 0).await;
        let got = tokio::time::timeout(Duration::from_millis(150), other.messages.next()).await;
        assert!(got.is_err(), "#1 went to another stream: {got:?}");
    }
    worker.ack(vec![1]).await;
    worker.finish().await;
    f.publish(b"next").await;
    let next = other.next().await;
    assert_eq!((next.sequence, next.delivery_count), (2, 1));
    other.ack(vec![2]).await;
    other.finish().await;

    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_rejected_large_message_goes_to_the_dead_letter_subject_and_the_stream_goes_on() {
    let mut f = fixture("consume-reject").await;
    create(&mut f, "picky", 60_000).await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    f.publish_offloaded(&payload, &HashMap::new()).await;
    f.publish(b"small").await;
    let mut stream = Stream::open(&mut f, "picky", 1).await;
    assert_eq!(stream.next().await.sequence, 1);
    stream.reject(vec![1], "too large to handle").await;
    // Its room is free at once.
    let next = stream.next().await;
    assert_eq!((next.sequence, next.delivery_count), (2, 1));
    stream.ack(vec![2]).await;
    stream.finish().await;

    let mut dead = fixture("consume-reject-dlq").await;
    dead.subject = format!("{}.dlq", f.subject);
    let letters = dead.fetch("inspector", 10).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].data, payload, "the payload is still readable");
    assert_eq!(
        letters[0].headers["mts-reject-reason"],
        "too large to handle"
    );
    assert_eq!(letters[0].headers["mts-origin-sequence"], "1");
    dead.service.stop().await.unwrap();
    f.service.stop().await.unwrap();
}

// Instant redelivery: a message let go of elsewhere reaches an idle stream
// of the durable when it is let go of, not when the stream's own timers
// (here a 60 s ack_wait, a 300 s watcher wait) would next make it look.

/// How long after it was let go of a message may reach an idle stream here:
/// far below any timer of these tests; the time taken is printed.
const PROMPTLY: Duration = Duration::from_secs(1);

/// The next message, and how long it took to come.
async fn timed(stream: &mut Stream) -> (Message, Duration) {
    let started = tokio::time::Instant::now();
    let message = tokio::time::timeout(PROMPTLY, stream.messages.next())
        .await
        .unwrap_or_else(|_| panic!("a message within {PROMPTLY:?}"))
        .expect("stream open")
        .expect("no error");
    (message, started.elapsed())
}

/// A consumer with a 60 s ack_wait, one message held by a unary Fetch, and
/// an idle stream opened after it.
async fn one_fetched_and_an_idle_stream(f: &mut Fixture, durable: &str) -> Stream {
    create(f, durable, 60_000).await;
    f.publish(b"held elsewhere").await;
    assert_eq!(sequences(&f.fetch(durable, 1).await), vec![1]);
    let mut idle = Stream::open(f, durable, 10).await;
    assert!(idle.quiet().await, "the message is held by the fetch");
    idle
}

#[tokio::test]
async fn a_nacked_message_reaches_an_idle_stream_at_once() {
    let mut f = fixture("consume-instant-nack").await;
    let mut idle = one_fetched_and_an_idle_stream(&mut f, "nack").await;
    f.client
        .nack(mts_proto::pb::NackRequest {
            subject: f.subject.clone(),
            durable_name: "nack".into(),
            sequences: vec![1],
            delay_ms: 0,
        })
        .await
        .unwrap();
    let (message, took) = timed(&mut idle).await;
    println!("nacked message reached the idle stream in {took:?}");
    assert_eq!((message.sequence, message.delivery_count), (1, 2));
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_lease_that_runs_out_reaches_an_idle_stream_when_it_ends() {
    let mut f = fixture("consume-instant-lapse").await;
    let mut idle = one_fetched_and_an_idle_stream(&mut f, "lapse").await;
    // The lease now ends in 300 ms: sooner than the idle stream last saw.
    f.client
        .extend_lease(mts_proto::pb::ExtendLeaseRequest {
            subject: f.subject.clone(),
            durable_name: "lapse".into(),
            sequences: vec![1],
            extend_ms: 300,
        })
        .await
        .unwrap();
    let (message, took) = timed(&mut idle).await;
    println!("a lease ending 300 ms on reached the idle stream in {took:?}");
    assert!(
        took >= Duration::from_millis(250),
        "not before the lease ended: {took:?}"
    );
    assert_eq!((message.sequence, message.delivery_count), (1, 2));
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn what_an_ended_stream_held_reaches_an_idle_stream_at_once() {
    let mut f = fixture("consume-instant-end").await;
    let first = three_delivered(&mut f, "end", 60_000).await;
    let mut idle = Stream::open(&mut f, "end", 10).await;
    assert!(idle.quiet().await, "all three are held by the first stream");
    first.finish().await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (message, took) = timed(&mut idle).await;
        println!(
            "released message {} reached the idle stream in {took:?}",
            message.sequence
        );
        got.push((message.sequence, message.delivery_count));
    }
    got.sort_unstable();
    assert_eq!(got, vec![(1, 2), (2, 2), (3, 2)]);
    f.service.stop().await.unwrap();
}

#[tokio::test]
async fn an_ack_that_makes_room_at_max_ack_pending_wakes_an_idle_stream() {
    let mut f = fixture("consume-instant-room").await;
    f.client
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "room".into(),
            config: Some(ConsumerConfig {
                ack_wait_ms: Some(60_000),
                max_ack_pending: Some(1),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap();
    f.publish(b"one").await;
    f.publish(b"two").await;
    assert_eq!(sequences(&f.fetch("room", 10).await), vec![1]);
    let mut idle = Stream::open(&mut f, "room", 10).await;
    assert!(idle.quiet().await, "the consumer holds max_ack_pending");
    assert!(f.ack("room", 1).await.unwrap());
    let (message, took) = timed(&mut idle).await;
    println!("room freed by an ack reached the idle stream in {took:?}");
    assert_eq!(message.sequence, 2);
    f.service.stop().await.unwrap();
}

/// A small deterministic generator: a failing run can be repeated with the
/// seed it printed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// What the three workers of the test below have seen.
#[derive(Default)]
struct Ledger {
    /// Which stream holds each message now (received, not acked or let go).
    holder: HashMap<u64, usize>,
    /// Messages a stream let go of unacked (it crashed, or ended holding them):
    /// only these may be delivered again.
    released: HashSet<u64>,
    deliveries: HashMap<u64, u32>,
    acked: HashMap<u64, u32>,
    violations: Vec<String>,
}

impl Ledger {
    /// Counts a delivery of `seq`; one after the first must follow a release.
    fn delivered(&mut self, seq: u64) {
        let count = self.deliveries.entry(seq).or_default();
        *count += 1;
        if *count > 1 && !self.released.remove(&seq) {
            self.violations
                .push(format!("{seq} delivered again though nobody let it go"));
        }
    }

    /// Stream `id` received `seq`.
    fn received(&mut self, id: usize, seq: u64) {
        if let Some(other) = self.holder.insert(seq, id) {
            self.violations
                .push(format!("{seq} held by streams {other} and {id} at once"));
        }
        self.delivered(seq);
    }
}

/// One stream's life: opened with a random window, it takes messages; a
/// "crash" stream acks nothing and is dropped at a random point, holding
/// what it got; any other acks most of what it processed and, at a random
/// point, closes its side, which ends the stream once its acks are applied.
async fn stream_life(
    (client, subject): (&EgressServiceClient<Channel>, &str),
    id: usize,
    dice: &mut Dice,
    ledger: &std::sync::Mutex<Ledger>,
) {
    let window = 1 + dice.roll(16) as u32;
    let crash = dice.roll(3) == 0;
    let life = 1 + dice.roll(40);
    let mut stream = Stream::open_on(client, subject, "chaos", window, true).await;
    let mut held = Vec::new();
    let mut taken = 0;
    while taken < life {
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(500), stream.messages.next()).await
        else {
            break;
        };
        let message = message.expect("no error");
        let seq = message.sequence;
        if seq == 0 {
            let why = format!("stream {id}: not held: {:?}", message.not_held);
            ledger.lock().unwrap().violations.push(why);
            continue;
        }
        ledger.lock().unwrap().received(id, seq);
        taken += 1;
        if crash || dice.roll(5) == 0 {
            held.push(seq);
        } else {
            {
                let mut l = ledger.lock().unwrap();
                l.holder.remove(&seq);
                *l.acked.entry(seq).or_default() += 1;
            }
            stream.ack(vec![seq]).await;
        }
    }
    // Let go of what is still held: by dropping the stream, or by closing
    // this side once the rest is acked.
    {
        let mut l = ledger.lock().unwrap();
        for seq in held {
            l.holder.remove(&seq);
            l.released.insert(seq);
        }
    }
    if crash {
        return;
    }
    let Stream {
        frames,
        mut messages,
    } = stream;
    drop(frames);
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(10), messages.next()).await
    {
        // Pushed before the server saw this side close, and let go of when
        // it did: another stream may have got it already.
        if message.sequence != 0 {
            let mut l = ledger.lock().unwrap();
            let count = l.deliveries.entry(message.sequence).or_default();
            *count += 1;
            if *count == 1 {
                l.released.insert(message.sequence);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_streams_cancelled_and_reopened_at_random_ack_each_message_once_and_never_share_one()
{
    const N: u64 = 400;
    let mut f = fixture("consume-chaos").await;
    // Crashed streams let go of a message any number of times: no dead
    // letters here.
    f.client
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "chaos".into(),
            config: Some(ConsumerConfig {
                ack_wait_ms: Some(60_000),
                max_deliver: Some(0),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let ledger = std::sync::Arc::new(std::sync::Mutex::new(Ledger::default()));
    let publisher = {
        let (store, subject) = (f.store.clone(), f.subject.clone());
        tokio::spawn(async move {
            for i in 0..N {
                store
                    .publish(&subject, &HashMap::new(), Some(&i.to_be_bytes()), None, 8)
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let mut workers = Vec::new();
    for id in 0..3 {
        let ledger = std::sync::Arc::clone(&ledger);
        let (client, subject) = (f.client.clone(), f.subject.clone());
        let mut dice = Dice(seed.wrapping_mul(id as u64 + 7) | 1);
        workers.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while ledger.lock().unwrap().acked.len() < N as usize
                && tokio::time::Instant::now() < deadline
            {
                stream_life((&client, &subject), id, &mut dice, &ledger).await;
            }
        }));
    }
    publisher.await.unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    {
        let l = ledger.lock().unwrap();
        assert!(l.violations.is_empty(), "seed {seed}: {:#?}", l.violations);
        assert_eq!(
            l.acked.len(),
            N as usize,
            "seed {seed}: every message acked"
        );
        let twice: Vec<_> = l.acked.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "seed {seed}: acked more than once: {twice:?}"
        );
        let redelivered = l.deliveries.values().filter(|n| **n > 1).count();
        println!("{redelivered} of {N} messages delivered more than once (let go of unacked)");
    }
    let info = f
        .client
        .get_consumer_info(ConsumerRequest {
            subject: f.subject.clone(),
            durable_name: "chaos".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.ack_floor, info.num_ack_pending), (N, 0));
    f.service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_interleaved_on_three_streams_arrive_in_order_one_at_a_time_per_key() {
    const PER_KEY: u64 = 30;
    let mut f = fixture("consume-keys").await;
    create(&mut f, "keys", 60_000).await;
    for i in 0..2 * PER_KEY {
        let key = if i % 2 == 0 { "x" } else { "y" };
        let headers = HashMap::from([(
            mts_storage::store::ORDERING_KEY_HEADER.to_owned(),
            key.to_owned(),
        )]);
        f.store
            .publish(&f.subject, &headers, Some(b"k"), None, 1)
            .await
            .unwrap();
    }
    // (stream, key, sequence, started or done), in the order it happened.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for id in 0..3usize {
        let log = std::sync::Arc::clone(&log);
        // One message at a time per stream: keys go side by side only
        // across streams.
        let mut stream = Stream::open_on(&f.client, &f.subject, "keys", 1, true).await;
        let mut dice = Dice(id as u64 * 7919 + 17);
        workers.push(tokio::spawn(async move {
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(1), stream.messages.next()).await
            {
                let key = message.headers["mts-ordering-key"].clone();
                log.lock()
                    .unwrap()
                    .push((id, key.clone(), message.sequence, true));
                tokio::time::sleep(Duration::from_millis(dice.roll(8))).await;
                log.lock().unwrap().push((id, key, message.sequence, false));
                stream.ack(vec![message.sequence]).await;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let mut in_flight: HashMap<String, u64> = HashMap::new();
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    let (mut streams, mut both_at_once) = (HashSet::new(), false);
    for (stream, key, seq, started) in &log {
        if *started {
            if let Some(previous) = in_flight.insert(key.clone(), *seq) {
                panic!("{key}: {seq} went out while {previous} was not done: {log:?}");
            }
            order.entry(key.clone()).or_default().push(*seq);
            streams.insert(*stream);
            both_at_once |= in_flight.len() == 2;
        } else {
            in_flight.remove(key);
        }
    }
    let expected = |first: u64| (0..PER_KEY).map(|i| first + 2 * i).collect::<Vec<_>>();
    assert_eq!(order["x"], expected(1), "x in order, each once");
    assert_eq!(order["y"], expected(2), "y in order, each once");
    assert!(both_at_once, "the two keys went on side by side");
    assert!(
        streams.len() >= 2,
        "competing streams shared the work: {streams:?}"
    );
    f.service.stop().await.unwrap();
}
