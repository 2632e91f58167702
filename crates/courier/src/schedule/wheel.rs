//! A hierarchical timing wheel: the scheduler's index of pending delayed messages on
//! backends that read by position (RocketMQ 5's timer design: a time-ordered log plus
//! an in-memory wheel rebuilt at start).
//!
//! What it guarantees:
//!
//! - **Same order as a min-heap.** Given the same sequence of [`Wheel::push`] and
//!   [`Wheel::pop_due`] calls, it returns exactly what a `BinaryHeap<Reverse<T>>`
//!   popped while its top is due would: everything due by `now`, earliest due first,
//!   equal due times in `T`'s `Ord` order. This needs `T`'s `Ord` to compare the due
//!   time first (as [`Timed`] requires).
//! - **Exact next due time.** [`Wheel::next_due`] is the earliest due time held, to
//!   the millisecond (each bucket tracks its earliest entry), so a sleep until it
//!   neither wakes early for nothing nor late.
//! - **Any due time.** Millisecond times over the whole `i64` range: 11 levels of 64
//!   buckets cover all 64 bits, so far-future entries (hours, days, `i64::MAX`) sit in
//!   a coarse bucket and move down a level each time the wheel reaches their bucket
//!   (at most 10 moves per entry, usually 2–4). Entries already due when pushed (due
//!   before the wheel's time) go to a small heap of ready entries and come out on the
//!   next pop.
//! - **Cost.** `push` is O(1) (a `Vec` push into a bucket; a push that is already due
//!   goes to the ready heap, O(1) on average); `pop_due` is O(log k) for the k entries
//!   in the ready heap (those of the due time reached, and those pushed already due),
//!   plus the moves above amortised over the entries.
//!   Memory is the entries themselves in `Vec` buckets (no per-entry allocation: a
//!   24-byte slot costs 24 bytes plus `Vec` growth slack), plus a fixed ~28 KiB of
//!   bucket headers.
//!
//! How: the wheel's time `elapsed` only moves forward, to the start of the earliest
//! non-empty bucket once that is due. An entry is placed at the level of the highest
//! 6-bit digit in which its due time differs from `elapsed`, in the bucket of that
//! digit. So every entry of level L shares all digits above L with `elapsed`, and all
//! of level L are due before all of level L+1: the earliest entry is in the lowest
//! occupied bucket of the lowest occupied level. Moving `elapsed` to the start of that
//! bucket keeps every other entry's placement valid, and re-placing the bucket's own
//! entries puts them on lower levels. A bucket whose entries share one due time (any
//! level-0 bucket: one millisecond; or a backlog scheduled for one instant) goes to
//! the ready heap whole, a large one becoming that heap in place.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// An entry of the wheel: something due at a time in epoch milliseconds.
///
/// `Ord` must order by [`Timed::due`] first (ties broken by anything), e.g. a derived
/// `Ord` on a struct whose first field is the due time.
pub(crate) trait Timed: Ord {
    /// Due time, epoch milliseconds.
    fn due(&self) -> i64;
}

/// Bits of the due time per level.
const BITS: u32 = 6;
/// Buckets per level.
const SLOTS: usize = 1 << BITS;
/// Levels: enough 6-bit digits for all 64 bits of a due time.
const LEVELS: usize = 64_usize.div_ceil(BITS as usize);
/// An emptied bucket keeps its allocation up to this many entries (reused by the
/// next entries of that bucket); a larger one is freed.
const KEEP_CAPACITY: usize = 256;

/// The ready heap keeps its allocation, once empty, up to this many entries.
const KEEP_READY: usize = 4096;

/// A due time as an unsigned key with the same order.
fn key(due: i64) -> u64 {
    (due as u64) ^ (1 << 63)
}

/// The due time of a key.
fn unkey(k: u64) -> i64 {
    (k ^ (1 << 63)) as i64
}

struct Level<T> {
    /// Bit `s` set: bucket `s` holds entries.
    occupied: u64,
    /// Earliest key per occupied bucket.
    min: [u64; SLOTS],
    /// Latest key per occupied bucket.
    max: [u64; SLOTS],
    buckets: [Vec<T>; SLOTS],
}

impl<T> Level<T> {
    fn new() -> Self {
        Self {
            occupied: 0,
            min: [u64::MAX; SLOTS],
            max: [0; SLOTS],
            buckets: std::array::from_fn(|_| Vec::new()),
        }
    }
}

/// Pending entries ordered by due time; see the module documentation.
pub(crate) struct Wheel<T> {
    levels: Box<[Level<T>; LEVELS]>,
    /// Entries due at or before the wheel's time, earliest (smallest) first.
    ready: BinaryHeap<Reverse<T>>,
    /// The wheel's time (a key): every entry in the levels is due at or after it.
    elapsed: u64,
    /// The level-0 bucket of `elapsed` was moved to `ready`: an entry due exactly at
    /// `elapsed` goes to `ready` too (after it, in `Ord` order, as a heap would do).
    drained: bool,
    len: usize,
}

impl<T: Timed> Wheel<T> {
    /// An empty wheel whose time starts at `now` (epoch ms). Any time works; one
    /// near the due times pushed saves moves between levels.
    pub(crate) fn new(now: i64) -> Self {
        Self {
            levels: Box::new(std::array::from_fn(|_| Level::new())),
            ready: BinaryHeap::new(),
            elapsed: key(now),
            drained: false,
            len: 0,
        }
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every entry (the wheel's time stays).
    pub(crate) fn clear(&mut self) {
        for level in self.levels.iter_mut() {
            for bucket in level.buckets.iter_mut() {
                *bucket = Vec::new();
            }
            level.min = [u64::MAX; SLOTS];
            level.max = [0; SLOTS];
            level.occupied = 0;
        }
        self.ready = BinaryHeap::new();
        self.len = 0;
    }

    /// Adds an entry. One due already (before the wheel's time) comes out on the next
    /// [`Wheel::pop_due`] whose `now` reaches it.
    pub(crate) fn push(&mut self, item: T) {
        self.len += 1;
        let k = key(item.due());
        if k < self.elapsed || (self.drained && k == self.elapsed) {
            self.ready.push(Reverse(item));
        } else {
            self.place(k, item);
        }
    }

    /// The earliest due time held, exact to the millisecond.
    pub(crate) fn next_due(&self) -> Option<i64> {
        if let Some(Reverse(t)) = self.ready.peek() {
            return Some(t.due());
        }
        let (l, s) = self.earliest()?;
        self.levels
            .get(l)
            .and_then(|l| l.min.get(s))
            .map(|k| unkey(*k))
    }

    /// Removes and returns the smallest entry if it is due by `now` (epoch ms).
    pub(crate) fn pop_due(&mut self, now: i64) -> Option<T> {
        let now = key(now);
        loop {
            if let Some(Reverse(t)) = self.ready.peek() {
                if key(t.due()) > now {
                    return None;
                }
                let Reverse(t) = self.ready.pop()?;
                self.len -= 1;
                if self.ready.is_empty() && self.ready.capacity() > KEEP_READY {
                    self.ready = BinaryHeap::new();
                }
                return Some(t);
            }
            let (l, s) = self.earliest()?;
            if self.levels[l].min[s] > now {
                return None;
            }
            self.open(l, s);
        }
    }

    /// The lowest occupied bucket of the lowest occupied level: it holds the earliest
    /// entry of the levels.
    fn earliest(&self) -> Option<(usize, usize)> {
        self.levels
            .iter()
            .position(|l| l.occupied != 0)
            .map(|l| (l, self.levels[l].occupied.trailing_zeros() as usize))
    }

    /// Puts an entry due at `k` (not before `elapsed`) in its bucket.
    fn place(&mut self, k: u64, item: T) {
        let diff = k ^ self.elapsed;
        let l = if diff == 0 {
            0
        } else {
            ((63 - diff.leading_zeros()) / BITS) as usize
        };
        let s = ((k >> (l as u32 * BITS)) as usize) & (SLOTS - 1);
        let level = &mut self.levels[l];
        level.buckets[s].push(item);
        level.occupied |= 1 << s;
        if k < level.min[s] {
            level.min[s] = k;
        }
        if k > level.max[s] {
            level.max[s] = k;
        }
    }

    /// Reaches bucket `s` of level `l` (the earliest, and due; `ready` is empty):
    /// moves the wheel's time to its start and its entries a level down, or to
    /// `ready` when they are all due at one time (always so on level 0).
    fn open(&mut self, l: usize, s: usize) {
        debug_assert!(self.ready.is_empty());
        let level = &mut self.levels[l];
        let mut bucket = std::mem::take(&mut level.buckets[s]);
        level.occupied &= !(1 << s);
        let (min, max) = (level.min[s], level.max[s]);
        level.min[s] = u64::MAX;
        level.max[s] = 0;
        if min == max {
            // One due time (a backlog scheduled for one instant, or any level-0
            // bucket): all of it is the earliest, and due. Every other entry is
            // later and shares the digits above `l` with `min`.
            debug_assert!(min >= self.elapsed);
            self.elapsed = min;
            self.drained = true;
            if bucket.capacity() > KEEP_CAPACITY {
                // Large: becomes the heap in place (no second copy).
                self.ready = BinaryHeap::from(bucket.into_iter().map(Reverse).collect::<Vec<_>>());
            } else {
                self.ready.extend(bucket.drain(..).map(Reverse));
                self.levels[l].buckets[s] = bucket;
            }
            return;
        }
        let shift = l as u32 * BITS;
        // Digits above level `l` are those of `elapsed`; the digit of `l` is `s`.
        let above = shift + BITS;
        let high = if above >= 64 {
            0
        } else {
            (self.elapsed >> above) << above
        };
        let start = high | ((s as u64) << shift);
        debug_assert!(l > 0 && start >= self.elapsed);
        self.elapsed = start;
        self.drained = false;
        for item in bucket.drain(..) {
            let k = key(item.due());
            self.place(k, item);
        }
        if bucket.capacity() <= KEEP_CAPACITY {
            // Nothing lands in the bucket just opened: its entries went down a level.
            self.levels[l].buckets[s] = bucket;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    struct Item {
        due: i64,
        id: u64,
    }

    impl Timed for Item {
        fn due(&self) -> i64 {
            self.due
        }
    }

    /// The behaviour the wheel must match: a min-heap popped while its top is due.
    struct Reference(BinaryHeap<Reverse<Item>>);

    impl Reference {
        fn pop_due(&mut self, now: i64) -> Option<Item> {
            if self.0.peek()?.0.due > now {
                return None;
            }
            self.0.pop().map(|Reverse(i)| i)
        }
        fn next_due(&self) -> Option<i64> {
            self.0.peek().map(|Reverse(i)| i.due)
        }
    }

    fn drain(w: &mut Wheel<Item>, now: i64) -> Vec<Item> {
        std::iter::from_fn(|| w.pop_due(now)).collect()
    }

    const T0: i64 = 1_764_800_000_000;

    #[test]
    fn random_inserts_come_out_sorted() {
        let mut rng = fastrand::Rng::with_seed(7);
        for spread in [1_i64, 10, 1_000, 100_000, 10_000_000, 1 << 40] {
            let mut w = Wheel::new(T0);
            let mut all = Vec::new();
            for id in 0..5_000 {
                let due = T0 + rng.i64(-spread..spread);
                all.push(Item { due, id });
                w.push(Item { due, id });
            }
            assert_eq!(w.len(), all.len());
            all.sort();
            assert_eq!(w.next_due(), all.first().map(|i| i.due));
            assert_eq!(drain(&mut w, i64::MAX), all, "spread {spread}");
            assert!(w.is_empty());
            assert_eq!(w.next_due(), None);
        }
    }

    #[test]
    fn pops_only_what_is_due_in_steps() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut w = Wheel::new(T0);
        let mut all: Vec<Item> = (0..20_000)
            .map(|id| Item {
                due: T0 + rng.i64(0..600_000),
                id,
            })
            .collect();
        for i in &all {
            w.push(*i);
        }
        all.sort();
        let mut now = T0 - 1;
        let mut out = Vec::new();
        while !w.is_empty() {
            now += rng.i64(0..5_000);
            for i in drain(&mut w, now) {
                assert!(i.due <= now, "{i:?} popped at {now}");
                out.push(i);
            }
            if let Some(next) = w.next_due() {
                assert!(next > now);
            }
        }
        assert_eq!(out, all);
    }

    #[test]
    fn far_future_entries() {
        let mut w = Wheel::new(T0);
        let dues = [
            i64::MAX,
            i64::MAX - 1,
            T0 + 365 * 24 * 3_600_000 * 1_000,
            T0 + 30 * 24 * 3_600_000,
            T0 + 24 * 3_600_000,
            T0 + 3_600_000,
            T0 + 3_600_001,
            T0 + 1,
        ];
        for (id, due) in dues.iter().enumerate() {
            w.push(Item {
                due: *due,
                id: id as u64,
            });
        }
        let mut sorted = dues.to_vec();
        sorted.sort();
        assert_eq!(w.pop_due(T0), None);
        for due in sorted {
            assert_eq!(w.next_due(), Some(due));
            assert_eq!(w.pop_due(due - 1), None, "{due} popped early");
            assert_eq!(w.pop_due(due).map(|i| i.due), Some(due));
        }
        assert!(w.is_empty());
        // Past the last millisecond, a push still comes out.
        w.push(Item { due: 5, id: 0 });
        w.push(Item {
            due: i64::MAX,
            id: 1,
        });
        assert_eq!(w.next_due(), Some(5));
        assert_eq!(drain(&mut w, i64::MAX).len(), 2);
    }

    #[test]
    fn far_future_then_the_clock_reaches_it() {
        // An entry due in a day waits while near ones come and go, then comes out on
        // time.
        let mut w = Wheel::new(T0);
        let day = T0 + 24 * 3_600_000;
        w.push(Item { due: day, id: 0 });
        let mut now = T0;
        let mut id = 1;
        let mut seen = false;
        while now < day + 10_000 {
            w.push(Item {
                due: now + 1_000,
                id,
            });
            id += 1;
            now += 997;
            for i in drain(&mut w, now) {
                assert!(i.due <= now && i.due > now - 997, "{i:?} late at {now}");
                seen |= i.id == 0;
            }
            assert_eq!(seen, now >= day, "at {now}");
        }
    }

    #[test]
    fn past_due_entries_go_out_first() {
        let mut w = Wheel::new(T0);
        w.push(Item {
            due: T0 + 10,
            id: 0,
        });
        w.push(Item { due: T0 - 5, id: 1 });
        w.push(Item {
            due: i64::MIN,
            id: 2,
        });
        w.push(Item { due: T0, id: 3 });
        assert_eq!(w.next_due(), Some(i64::MIN));
        let got: Vec<u64> = drain(&mut w, T0).iter().map(|i| i.id).collect();
        assert_eq!(got, [2, 1, 3]);
        // Pushed after the clock passed them: due at once, in order.
        w.push(Item { due: T0 - 1, id: 4 });
        w.push(Item { due: T0, id: 5 });
        w.push(Item {
            due: T0 - 100,
            id: 6,
        });
        let got: Vec<u64> = drain(&mut w, T0).iter().map(|i| i.id).collect();
        assert_eq!(got, [6, 4, 5]);
        assert_eq!(w.len(), 1);
        assert_eq!(drain(&mut w, T0 + 10).len(), 1);
    }

    #[test]
    fn equal_due_times_in_ord_order() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut w = Wheel::new(T0);
        let mut ids: Vec<u64> = (0..1_000).collect();
        rng.shuffle(&mut ids);
        let due = T0 + 70_000;
        for id in &ids[..500] {
            w.push(Item { due, id: *id });
        }
        // Some of the same millisecond are popped, then more of it arrive.
        let first: Vec<Item> = (0..100).filter_map(|_| w.pop_due(due)).collect();
        let mut expect: Vec<u64> = ids[..500].to_vec();
        expect.sort();
        assert_eq!(
            first.iter().map(|i| i.id).collect::<Vec<_>>(),
            expect[..100]
        );
        for id in &ids[500..] {
            w.push(Item { due, id: *id });
        }
        let mut rest: Vec<u64> = expect[100..].to_vec();
        rest.extend(&ids[500..]);
        rest.sort();
        let got: Vec<u64> = drain(&mut w, due).iter().map(|i| i.id).collect();
        assert_eq!(got, rest);
    }

    #[test]
    fn interleaved_with_a_moving_clock_matches_a_heap() {
        for seed in 0..20 {
            let mut rng = fastrand::Rng::with_seed(seed);
            // Start just before a digit boundary at some seeds (carries between
            // levels when the clock crosses it).
            let start = T0 - (T0.rem_euclid(4096)) - rng.i64(0..3);
            let mut w = Wheel::new(start);
            let mut r = Reference(BinaryHeap::new());
            let mut now = start;
            for _ in 0..3_000 {
                for _ in 0..rng.usize(0..8) {
                    let due = match rng.u8(0..10) {
                        0 => now - rng.i64(0..10_000),
                        1 => now + rng.i64(0..100_000_000),
                        2 => now,
                        3 => now + 1,
                        4 => i64::MAX - rng.i64(0..3),
                        _ => now + rng.i64(0..300),
                    };
                    let it = Item {
                        due,
                        id: rng.u64(0..50),
                    };
                    w.push(it);
                    r.0.push(Reverse(it));
                }
                assert_eq!(w.next_due(), r.next_due(), "seed {seed} at {now}");
                // Sometimes pop only part of what is due.
                let k = if rng.bool() {
                    usize::MAX
                } else {
                    rng.usize(0..4)
                };
                for _ in 0..k {
                    let (a, b) = (w.pop_due(now), r.pop_due(now));
                    assert_eq!(a, b, "seed {seed} at {now}");
                    if a.is_none() {
                        break;
                    }
                }
                assert_eq!(w.len(), r.0.len());
                now += match rng.u8(0..10) {
                    0 => rng.i64(0..1_000_000),
                    1 => 0,
                    _ => rng.i64(0..70),
                };
            }
            let (a, b) = (drain(&mut w, i64::MAX), {
                let mut v = Vec::new();
                while let Some(i) = r.pop_due(i64::MAX) {
                    v.push(i);
                }
                v
            });
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn a_backlog_due_at_one_instant() {
        let mut w = Wheel::new(T0);
        let due = T0 + 3_600_000;
        let n = 10_000;
        for id in (0..n).rev() {
            w.push(Item { due, id });
        }
        w.push(Item {
            due: due + 1,
            id: 0,
        });
        w.push(Item {
            due: due + 100_000,
            id: 0,
        });
        assert_eq!(w.next_due(), Some(due));
        assert_eq!(w.pop_due(due - 1), None);
        let first: Vec<u64> = (0..10)
            .filter_map(|_| w.pop_due(due))
            .map(|i| i.id)
            .collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        // More of the same instant, and earlier, while it drains.
        w.push(Item { due, id: 5 });
        w.push(Item {
            due: due - 7,
            id: n,
        });
        assert_eq!(w.pop_due(due).map(|i| (i.due, i.id)), Some((due - 7, n)));
        let rest: Vec<u64> = drain(&mut w, due).iter().map(|i| i.id).collect();
        let mut expect: Vec<u64> = (10..n).collect();
        expect.insert(0, 5);
        assert_eq!(rest, expect);
        assert_eq!(w.len(), 2);
        // The drained heap let go of its allocation.
        assert!(w.ready.capacity() <= KEEP_READY);
        assert_eq!(w.next_due(), Some(due + 1));
        assert_eq!(drain(&mut w, due + 100_000).len(), 2);
        assert!(w.is_empty());
    }

    #[test]
    fn len_and_clear() {
        let mut w = Wheel::new(T0);
        assert_eq!(w.len(), 0);
        for id in 0..100 {
            w.push(Item {
                due: T0 + id as i64 * 1_000 - 50_000,
                id,
            });
        }
        assert_eq!(w.len(), 100);
        assert_eq!(drain(&mut w, T0).len(), 51);
        assert_eq!(w.len(), 49);
        w.clear();
        assert_eq!(w.len(), 0);
        assert_eq!(w.next_due(), None);
        assert_eq!(w.pop_due(i64::MAX), None);
        w.push(Item { due: T0, id: 1 });
        w.push(Item { due: T0 - 1, id: 2 });
        assert_eq!(w.len(), 2);
        assert_eq!(
            drain(&mut w, T0).iter().map(|i| i.id).collect::<Vec<_>>(),
            [2, 1]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_24_byte_entry_costs_about_24_bytes() {
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        struct Slot(i64, u32, u32, u64);
        impl Timed for Slot {
            fn due(&self) -> i64 {
                self.0
            }
        }
        assert_eq!(std::mem::size_of::<Slot>(), 24);
        let mut w = Wheel::new(T0);
        let n = 100_000_u64;
        for i in 0..n {
            w.push(Slot(T0 + 3_600_000, 0, 1, i));
        }
        let held: usize = w
            .levels
            .iter()
            .flat_map(|l| l.buckets.iter())
            .map(|b| b.capacity() * std::mem::size_of::<Slot>())
            .sum();
        // One bucket grown by doubling: at most twice the entries.
        assert!(held <= 2 * n as usize * 24, "{held}");
    }
}
