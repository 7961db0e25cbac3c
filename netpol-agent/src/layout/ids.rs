//! Interning content hashes to the kernel's u32 set ids.

use std::collections::{BTreeMap, BTreeSet};

use super::LayoutError;

/// Allocates nonzero u32 ids for content hashes. An id stays the same while its content exists.
/// An id freed by one update is not handed out again before the next update: the dataplane
/// writes new sets, then switches endpoints, then deletes old sets, so reusing an id within one
/// update would overwrite a set that endpoints still reference.
#[derive(Clone, Debug, Default)]
pub struct IdAllocator {
    ids: BTreeMap<u64, u32>,
    free: BTreeSet<u32>,
    freed_last_update: Vec<u32>,
    next: u32,
}

impl IdAllocator {
    /// The id of `hash`, if allocated.
    pub fn get(&self, hash: u64) -> Option<u32> {
        self.ids.get(&hash).copied()
    }

    /// Makes the allocation exactly `hashes`: keeps existing ids, allocates new ones (smallest
    /// free id first, in hash order) and frees the rest.
    pub fn update(
        &mut self,
        hashes: &BTreeSet<u64>,
        what: &'static str,
    ) -> Result<(), LayoutError> {
        self.free.extend(self.freed_last_update.drain(..));
        let gone: Vec<u64> = self.ids.keys().filter(|h| !hashes.contains(h)).copied().collect();
        for hash in hashes {
            if self.ids.contains_key(hash) {
                continue;
            }
            let id = match self.free.pop_first() {
                Some(id) => id,
                None => {
                    self.next =
                        self.next.checked_add(1).ok_or(LayoutError::IdsExhausted { what })?;
                    self.next
                }
            };
            self.ids.insert(*hash, id);
        }
        for hash in gone {
            if let Some(id) = self.ids.remove(&hash) {
                self.freed_last_update.push(id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_nonzero_and_not_reused_in_the_same_update() {
        let mut a = IdAllocator::default();
        a.update(&BTreeSet::from([10, 20]), "t").unwrap();
        let (i10, i20) = (a.get(10).unwrap(), a.get(20).unwrap());
        assert!(i10 != 0 && i20 != 0 && i10 != i20);
        a.update(&BTreeSet::from([20, 30]), "t").unwrap();
        assert_eq!(a.get(20), Some(i20));
        assert_eq!(a.get(10), None);
        assert_ne!(a.get(30), Some(i10), "freed in this update");
        a.update(&BTreeSet::from([20, 30, 40]), "t").unwrap();
        assert_eq!(a.get(40), Some(i10), "reused one update later");
    }
}
