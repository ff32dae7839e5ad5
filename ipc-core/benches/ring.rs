//! Micro-benchmarks of the frame ring over heap memory, in one process.
//!
//! - `push_pop`: one frame pushed, published, popped and released, for a
//!   range of payload sizes (bytes/s).
//! - `batch`: 32 frames of 64 bytes pushed, one publish, 32 pops, one release
//!   (frames/s): what batching saves over `push_pop/64`.
//! - `cross_thread`: a producer thread and a consumer thread spinning on the
//!   same ring, no doorbell (frames/s): the cost of the cache lines moving
//!   between cores.
//! - `copy`: the rings' payload copy (aligned 64-bit `Relaxed` atomic words,
//!   which keeps a racing peer from being undefined behaviour) against plain
//!   `memcpy` (`copy_from_slice`) between private buffers, into and out of a
//!   region, at 64 B, 4 KiB, 64 KiB and 1 MiB (bytes/s).
//!
//! Run with `cargo bench -p ipc-core --bench ring`. The machines are shared
//! and noisy: compare figures as ratios taken in the same run, and see
//! `stress` for end-to-end speed.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use ipc_core::{Consumer, HeapMemory, Producer, PushError, Region, Segment, SegmentLayout};

/// Ring capacity for payloads up to 16 KiB.
const SMALL_RING: u32 = 64 * 1024;
/// Ring capacity for larger payloads (the maximum payload is half the ring
/// minus a header).
const LARGE_RING: u32 = 1024 * 1024;

/// Both ends of the request ring of a fresh heap-backed segment.
fn ring(capacity: u32) -> (Producer, Consumer) {
    let layout = SegmentLayout::new(capacity).expect("bench ring capacity is a valid layout");
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    let segment = Segment::new(region, &layout);
    (segment.request_producer, segment.request_consumer)
}

fn capacity_for(payload: usize) -> u32 {
    if payload > 16 * 1024 {
        LARGE_RING
    } else {
        SMALL_RING
    }
}

fn push_pop(c: &mut Criterion) {
    let mut group = c.benchmark_group("push_pop");
    for size in [8usize, 64, 1024, 4096, 65536] {
        let (mut tx, mut rx) = ring(capacity_for(size));
        let payload = vec![0xa5u8; size];
        let mut out = Vec::with_capacity(size);
        let mut request_id = 0u64;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                // The ring is empty on entry, so the push always fits; the
                // indices keep advancing, so wrap-around and its pad frames
                // are part of the measured cost.
                request_id += 1;
                tx.try_push(1, 0, request_id, black_box(&payload)).expect("an empty ring takes one frame");
                black_box(tx.publish());
                let header = rx.try_pop(&mut out).expect("honest producer").expect("frame was published");
                black_box((header, &out));
                black_box(rx.release());
            });
        });
    }
    group.finish();
}

fn batch(c: &mut Criterion) {
    const FRAMES: u64 = 32;
    const SIZE: usize = 64;
    let mut group = c.benchmark_group("batch");
    let (mut tx, mut rx) = ring(SMALL_RING);
    let payload = [0x5au8; SIZE];
    let mut out = Vec::with_capacity(SIZE);
    let mut request_id = 0u64;
    group.throughput(Throughput::Elements(FRAMES));
    group.bench_function(BenchmarkId::new(format!("{FRAMES}x"), SIZE), |b| {
        b.iter(|| {
            // 32 frames of 80 bytes each fit an empty 64 KiB ring.
            for _ in 0..FRAMES {
                request_id += 1;
                tx.try_push(1, 0, request_id, black_box(&payload)).expect("the batch fits an empty ring");
            }
            black_box(tx.publish());
            for _ in 0..FRAMES {
                let header = rx.try_pop(&mut out).expect("honest producer").expect("frame was published");
                black_box((header, &out));
            }
            black_box(rx.release());
        });
    });
    group.finish();
}

/// Set when a thread of a `cross_thread` run ends, normally or by panic, so
/// its peer stops spinning instead of waiting forever.
struct Exited<'a>(&'a AtomicBool);

impl Drop for Exited<'_> {
    fn drop(&mut self) {
        // Relaxed: only a stop signal; no data is handed over through it.
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Spins once while waiting on the peer. Yields now and then: with two
/// cores shared with other work, a pure spin could starve the peer.
fn backoff(spins: &mut u32, peer_exited: &AtomicBool) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(1024) {
        // Relaxed: a stop signal only (see `Exited`).
        assert!(!peer_exited.load(Ordering::Relaxed), "peer thread exited before the run ended");
        thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Sends `messages` frames of `size` bytes from this thread to a consumer
/// thread and returns the time from the first push to the last pop.
fn run_cross_thread(messages: u64, size: usize) -> Duration {
    // How many frames the consumer pops before handing space back, if the
    // ring does not run empty first.
    const RELEASE_EVERY: u64 = 16;
    let (mut tx, mut rx) = ring(SMALL_RING);
    let payload = vec![0x3cu8; size];
    let start_line = Barrier::new(2);
    let producer_exited = AtomicBool::new(false);
    let consumer_exited = AtomicBool::new(false);
    thread::scope(|s| {
        let consumer = s.spawn(|| {
            let _exited = Exited(&consumer_exited);
            let mut out = Vec::with_capacity(size);
            let mut unreleased = 0;
            let mut spins = 0;
            start_line.wait();
            let mut received = 0;
            while received < messages {
                match rx.try_pop(&mut out).expect("honest producer") {
                    Some(header) => {
                        assert_eq!(header.request_id, received, "frames arrive in order");
                        black_box(&out);
                        received += 1;
                        unreleased += 1;
                        if unreleased == RELEASE_EVERY {
                            rx.release();
                            unreleased = 0;
                        }
                    }
                    None => {
                        // Caught up: hand back what was read so the
                        // producer is never kept waiting on it.
                        rx.release();
                        unreleased = 0;
                        backoff(&mut spins, &producer_exited);
                    }
                }
            }
            rx.release();
            Instant::now()
        });

        let _exited = Exited(&producer_exited);
        let mut spins = 0;
        start_line.wait();
        let start = Instant::now();
        for request_id in 0..messages {
            loop {
                match tx.try_push(1, 0, request_id, black_box(&payload)) {
                    Ok(()) => break,
                    Err(PushError::Full) => backoff(&mut spins, &consumer_exited),
                    Err(e) => panic!("push failed: {e}"),
                }
            }
            // Publish every frame, as a caller sending one message at a
            // time does; no doorbell, since the consumer never sleeps.
            black_box(tx.publish());
        }
        let end = consumer.join().expect("consumer thread panicked");
        end.duration_since(start)
    })
}

fn cross_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_thread");
    // Two spinning threads occupy both cores of the usual machine: keep the
    // run short.
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for size in [64usize, 4096] {
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| run_cross_thread(iters, size));
        });
    }
    group.finish();
}

fn copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy");
    for size in [64usize, 4096, 65536, 1 << 20] {
        // Offsets like a frame's payload: 16 bytes past a word boundary.
        let region = ipc_core::bench::region(2 * size + 4096);
        let src = vec![0x5au8; size];
        let mut dst = vec![0u8; size];
        let mut private = vec![0u8; size + 16];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("atomic_in", size), |b| {
            b.iter(|| ipc_core::bench::atomic_copy_in(&region, 16, black_box(&src)));
        });
        group.bench_function(BenchmarkId::new("memcpy_in", size), |b| {
            b.iter(|| private[16..].copy_from_slice(black_box(&src)));
        });
        group.bench_function(BenchmarkId::new("atomic_out", size), |b| {
            b.iter(|| ipc_core::bench::atomic_copy_out(&region, 16, black_box(&mut dst)));
        });
        group.bench_function(BenchmarkId::new("memcpy_out", size), |b| {
            b.iter(|| black_box(&mut dst).copy_from_slice(&private[16..]));
        });
    }
    group.finish();
}

/// Holds the group: `criterion_group!` expands to an undocumented `pub fn`,
/// which `missing_docs` accepts only out of the crate's public surface.
mod entry {
    criterion::criterion_group!(benches, super::push_pop, super::batch, super::cross_thread, super::copy);
}

criterion_main!(entry::benches);
