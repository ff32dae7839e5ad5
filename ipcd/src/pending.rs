//! The acceptor's unfinished handshakes: each with a deadline, the
//! deadlines in order, and the handshakes of each owner (a uid, or TCP as a
//! whole) in the order they came, for the cap on how many may be pending.
//!
//! The deadlines sit in a `BTreeSet` of `(deadline, key)`: the next one is
//! its first element, an expired one is taken off the front, and a
//! handshake that finishes or is rescheduled is taken out exactly, so the
//! acceptor's loop costs O(log n) per deadline it handles and allocates
//! nothing. Each owner's handshakes form a list linked through the entries
//! (oldest first), so the oldest of any owner is found, and any handshake
//! unlinked, in constant time.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use slab::Slab;

/// Whose handshake it is, for sharing the cap: a Unix peer by its uid;
/// TCP peers, which carry no credentials, all as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Uid(u32),
    Tcp,
}

struct Entry<T> {
    value: T,
    owner: Owner,
    deadline: Instant,
    /// The owner's handshakes that came just before and just after.
    older: Option<usize>,
    newer: Option<usize>,
}

/// One owner's handshakes: how many, the first and the last to come.
struct Queue {
    count: usize,
    oldest: usize,
    newest: usize,
}

/// Unfinished handshakes by key, with their deadlines and owners.
pub(crate) struct PendingSet<T> {
    entries: Slab<Entry<T>>,
    deadlines: BTreeSet<(Instant, usize)>,
    owners: HashMap<Owner, Queue>,
}

impl<T> Default for PendingSet<T> {
    fn default() -> PendingSet<T> {
        PendingSet { entries: Slab::new(), deadlines: BTreeSet::new(), owners: HashMap::new() }
    }
}

impl<T> PendingSet<T> {
    /// How many handshakes are pending.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The key the next [`insert`](Self::insert) will return.
    pub(crate) fn vacant_key(&self) -> usize {
        self.entries.vacant_key()
    }

    /// Adds a handshake of `owner` that expires at `deadline`, as the
    /// owner's newest; returns its key.
    pub(crate) fn insert(&mut self, value: T, owner: Owner, deadline: Instant) -> usize {
        let key = self.entries.vacant_key();
        let older = match self.owners.get_mut(&owner) {
            Some(queue) => {
                let older = queue.newest;
                queue.newest = key;
                queue.count += 1;
                self.entries[older].newer = Some(key);
                Some(older)
            }
            None => {
                self.owners.insert(owner, Queue { count: 1, oldest: key, newest: key });
                None
            }
        };
        let inserted = self.entries.insert(Entry { value, owner, deadline, older, newer: None });
        debug_assert_eq!(inserted, key);
        self.deadlines.insert((deadline, key));
        key
    }

    /// Removes the handshake `key`, if pending.
    pub(crate) fn remove(&mut self, key: usize) -> Option<T> {
        let entry = self.entries.try_remove(key)?;
        self.deadlines.remove(&(entry.deadline, key));
        if let Some(older) = entry.older {
            self.entries[older].newer = entry.newer;
        }
        if let Some(newer) = entry.newer {
            self.entries[newer].older = entry.older;
        }
        let queue = self.owners.get_mut(&entry.owner).expect("a pending handshake's owner has a queue");
        queue.count -= 1;
        if queue.count == 0 {
            self.owners.remove(&entry.owner);
        } else {
            if queue.oldest == key {
                queue.oldest = entry.newer.expect("a queue of more than one has a next");
            }
            if queue.newest == key {
                queue.newest = entry.older.expect("a queue of more than one has a previous");
            }
        }
        Some(entry.value)
    }

    pub(crate) fn get(&self, key: usize) -> Option<&T> {
        self.entries.get(key).map(|e| &e.value)
    }

    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key).map(|e| &mut e.value)
    }

    /// Moves the deadline of `key` to `deadline`.
    pub(crate) fn set_deadline(&mut self, key: usize, deadline: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            self.deadlines.remove(&(entry.deadline, key));
            entry.deadline = deadline;
            self.deadlines.insert((deadline, key));
        }
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Takes the earliest deadline off the timer if it has passed at `now`,
    /// returning its handshake's key. The handshake stays pending, with no
    /// deadline, until the caller removes it or sets a new one.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<usize> {
        let &(deadline, key) = self.deadlines.first()?;
        if deadline > now {
            return None;
        }
        self.deadlines.pop_first();
        Some(key)
    }

    /// How many handshakes `owner` has pending.
    pub(crate) fn count(&self, owner: Owner) -> usize {
        self.owners.get(&owner).map_or(0, |q| q.count)
    }

    /// The owner with the most handshakes pending, and how many. Costs one
    /// look at each owner that has some.
    pub(crate) fn heaviest(&self) -> Option<(Owner, usize)> {
        self.owners.iter().map(|(&owner, q)| (owner, q.count)).max_by_key(|&(_, count)| count)
    }

    /// The key of `owner`'s oldest pending handshake.
    pub(crate) fn oldest(&self, owner: Owner) -> Option<usize> {
        self.owners.get(&owner).map(|q| q.oldest)
    }

    /// The keys of every pending handshake (for shutting down).
    pub(crate) fn keys(&self) -> Vec<usize> {
        self.entries.iter().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_come_out_in_order_and_only_once_passed() {
        let mut set = PendingSet::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let a = set.insert("a", Owner::Uid(1), at(30));
        let b = set.insert("b", Owner::Uid(1), at(10));
        let c = set.insert("c", Owner::Tcp, at(20));
        assert_eq!(set.next_deadline(), Some(at(10)));
        assert_eq!(set.pop_expired(at(5)), None);
        assert_eq!(set.pop_expired(at(25)), Some(b));
        assert_eq!(set.pop_expired(at(25)), Some(c));
        assert_eq!(set.pop_expired(at(25)), None);
        // Popped handshakes stay until removed or rescheduled.
        assert_eq!(set.len(), 3);
        set.set_deadline(c, at(40));
        assert_eq!(set.remove(b), Some("b"));
        assert_eq!(set.next_deadline(), Some(at(30)));
        // A rescheduled deadline replaces the old one, and a removed
        // handshake's deadline goes with it.
        set.set_deadline(a, at(50));
        assert_eq!(set.pop_expired(at(45)), Some(c));
        assert_eq!(set.remove(a), Some("a"));
        assert_eq!(set.next_deadline(), None);
        assert_eq!(set.remove(c), Some("c"));
        assert_eq!(set.len(), 0);
        assert!(set.deadlines.is_empty() && set.owners.is_empty());
    }

    #[test]
    fn owners_are_counted_and_their_oldest_found() {
        let mut set = PendingSet::default();
        let t = Instant::now();
        let keys: Vec<usize> = (0..5).map(|i| set.insert(i, Owner::Uid(7), t)).collect();
        let other = set.insert(99, Owner::Uid(8), t);
        let tcp = set.insert(100, Owner::Tcp, t);
        assert_eq!((set.count(Owner::Uid(7)), set.count(Owner::Uid(8)), set.count(Owner::Tcp)), (5, 1, 1));
        assert_eq!(set.count(Owner::Uid(9)), 0);
        assert_eq!(set.heaviest(), Some((Owner::Uid(7), 5)));
        assert_eq!(set.oldest(Owner::Uid(7)), Some(keys[0]));
        // Unlinking from the front, the middle and the back keeps the order.
        set.remove(keys[0]);
        assert_eq!(set.oldest(Owner::Uid(7)), Some(keys[1]));
        set.remove(keys[2]);
        set.remove(keys[4]);
        assert_eq!(set.oldest(Owner::Uid(7)), Some(keys[1]));
        set.remove(keys[1]);
        assert_eq!(set.oldest(Owner::Uid(7)), Some(keys[3]));
        // A newcomer goes to the back of its owner's queue.
        let late = set.insert(5, Owner::Uid(7), t);
        set.remove(keys[3]);
        assert_eq!(set.oldest(Owner::Uid(7)), Some(late));
        assert_eq!(set.count(Owner::Uid(7)), 1);
        for key in [late, other, tcp] {
            set.remove(key);
        }
        assert_eq!(set.heaviest(), None);
        assert!(set.owners.is_empty());
    }

    #[test]
    fn keys_are_reused_without_confusion() {
        let mut set = PendingSet::default();
        let t = Instant::now();
        let first = set.insert('x', Owner::Uid(1), t);
        set.remove(first);
        assert_eq!(set.vacant_key(), first);
        let again = set.insert('y', Owner::Uid(2), t + Duration::from_secs(1));
        assert_eq!(again, first);
        assert_eq!(set.pop_expired(t), None, "the removed handshake's deadline went with it");
        assert_eq!((set.count(Owner::Uid(1)), set.count(Owner::Uid(2))), (0, 1));
        assert_eq!(set.get(again), Some(&'y'));
    }
}
