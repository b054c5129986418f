//! A map from string keys to values that knows which entry was used least
//! recently, in O(1) for every operation: entries live in a slab, linked in
//! recency order by indices. An entry can be pinned (taken out of the
//! order, so that it is never offered for eviction) and unpinned.
//!
//! Every bounded, per-caller table of the model guard (limit state, the
//! detector's identities and their remembered steps) is one of these, so
//! that making room never scans the table under its lock.

use std::collections::HashMap;
use std::sync::Arc;

const NIL: usize = usize::MAX;

struct Node<V> {
    key: Arc<str>,
    value: V,
    prev: usize,
    next: usize,
    /// In the recency order (not pinned, not free).
    linked: bool,
}

/// See the module documentation.
pub struct LruMap<V> {
    index: HashMap<Arc<str>, usize>,
    nodes: Vec<Node<V>>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
}

impl<V> Default for LruMap<V> {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl<V> LruMap<V> {
    /// Entries held (pinned or not).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The slot of `key`, if held.
    pub fn find(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    /// The value in slot `i` (from [`Self::find`] or [`Self::insert`]).
    pub fn get(&self, i: usize) -> &V {
        &self.nodes[i].value
    }

    /// The value in slot `i`, to change.
    pub fn get_mut(&mut self, i: usize) -> &mut V {
        &mut self.nodes[i].value
    }

    /// Adds `key` (not held yet) as the most recently used; returns its slot.
    pub fn insert(&mut self, key: Arc<str>, value: V) -> usize {
        let node = Node {
            key: key.clone(),
            value,
            prev: NIL,
            next: NIL,
            linked: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.index.insert(key, i);
        self.link_front(i);
        i
    }

    /// Removes slot `i`; returns its key and value (the slot is reused by
    /// the next insert).
    pub fn remove(&mut self, i: usize) -> (Arc<str>, V)
    where
        V: Default,
    {
        self.unlink(i);
        let key = self.nodes[i].key.clone();
        self.index.remove(&key);
        self.free.push(i);
        let value = std::mem::take(&mut self.nodes[i].value);
        (key, value)
    }

    /// Puts `key` (not held yet) and `value` in slot `i` in place of what
    /// it held, as the most recently used; returns the old key and value.
    pub fn replace(&mut self, i: usize, key: Arc<str>, value: V) -> (Arc<str>, V) {
        self.unlink(i);
        let n = &mut self.nodes[i];
        let old_key = std::mem::replace(&mut n.key, key.clone());
        let old = std::mem::replace(&mut n.value, value);
        self.index.remove(&old_key);
        self.index.insert(key, i);
        self.link_front(i);
        (old_key, old)
    }

    /// The key of slot `i`.
    #[cfg(test)]
    pub fn key(&self, i: usize) -> &Arc<str> {
        &self.nodes[i].key
    }

    /// Marks slot `i` the most recently used (a pinned slot stays pinned).
    pub fn touch(&mut self, i: usize) {
        if self.nodes[i].linked && self.head != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    /// Takes slot `i` out of the recency order: it is never offered for
    /// eviction until [`Self::unpin`].
    pub fn pin(&mut self, i: usize) {
        self.unlink(i);
    }

    /// Puts a pinned slot back, as the most recently used.
    pub fn unpin(&mut self, i: usize) {
        if !self.nodes[i].linked {
            self.link_front(i);
        }
    }

    /// The least recently used unpinned slot.
    pub fn oldest(&self) -> Option<usize> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// The unpinned slot used just after slot `i` (toward the most recent).
    pub fn newer(&self, i: usize) -> Option<usize> {
        let p = self.nodes[i].prev;
        (p != NIL).then_some(p)
    }

    fn unlink(&mut self, i: usize) {
        if !self.nodes[i].linked {
            return;
        }
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
        let n = &mut self.nodes[i];
        n.prev = NIL;
        n.next = NIL;
        n.linked = false;
    }

    fn link_front(&mut self, i: usize) {
        let head = self.head;
        let n = &mut self.nodes[i];
        n.prev = NIL;
        n.next = head;
        n.linked = true;
        if head != NIL {
            self.nodes[head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_oldest_first(m: &LruMap<u32>) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = m.oldest();
        while let Some(i) = at {
            out.push(m.key(i).to_string());
            at = m.newer(i);
        }
        out
    }

    #[test]
    fn recency_follows_inserts_and_touches() {
        let mut m = LruMap::default();
        let a = m.insert("a".into(), 1);
        m.insert("b".into(), 2);
        m.insert("c".into(), 3);
        assert_eq!(keys_oldest_first(&m), ["a", "b", "c"]);
        m.touch(a);
        assert_eq!(keys_oldest_first(&m), ["b", "c", "a"]);
        let b = m.find("b").unwrap();
        assert_eq!(m.remove(b), ("b".into(), 2));
        assert_eq!(keys_oldest_first(&m), ["c", "a"]);
        // The freed slot is reused.
        assert_eq!(m.insert("d".into(), 4), b);
        assert_eq!(m.len(), 3);
        assert_eq!(*m.get(m.find("d").unwrap()), 4);
        let c = m.find("c").unwrap();
        assert_eq!(m.replace(c, "e".into(), 5), ("c".into(), 3));
        assert_eq!(keys_oldest_first(&m), ["a", "d", "e"]);
        assert!(m.find("c").is_none());
    }

    #[test]
    fn pinned_entries_are_never_the_oldest() {
        let mut m = LruMap::default();
        let a = m.insert("a".into(), 1);
        m.insert("b".into(), 2);
        m.pin(a);
        m.touch(a);
        assert_eq!(keys_oldest_first(&m), ["b"]);
        let b = m.find("b").unwrap();
        m.pin(b);
        assert_eq!(m.oldest(), None);
        m.unpin(a);
        assert_eq!(keys_oldest_first(&m), ["a"]);
        assert_eq!(m.len(), 2);
    }
}
