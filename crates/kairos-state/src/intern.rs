//! String interning: item, category and brand ids become dense `u32` indices.
//!
//! Relations, sessions and profiles hold millions of references to items; a `u32` is 4 bytes
//! where a `String` is 24 plus its heap. Indices are assigned in first-seen order, which is the log
//! order, so a replay of the same log assigns the same indices.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, Default)]
pub struct Interner {
    names: Vec<Box<str>>,
    index: FxHashMap<Box<str>, u32>,
}

impl Interner {
    pub fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.into());
        self.index.insert(name.into(), i);
        i
    }

    pub fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        let strings: usize = self.names.iter().map(|n| n.len()).sum();
        // Each name is stored twice (vector and map key) plus the map's slot.
        2 * strings + self.names.capacity() * 16 + self.index.capacity() * 24
    }
}

impl Serialize for Interner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Interner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names: Vec<Box<str>> = Vec::deserialize(d)?;
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Ok(Interner { names, index })
    }
}
