//! The key table of the permutohedral lattice (pydensecrf permutohedral.cpp's `HashTable`),
//! and the packing of lattice keys into a `u128`.
//!
//! It owns the map from a vertex's key to its id, which only the bilateral (hashed) lattice
//! needs: the Gaussian kernel's lattice indexes its small key box densely instead
//! (`Lattice::new_dense2`). Vertex ids never influence a number, only memory order. Its own
//! accesses are bounds-checked; it uses the prefetch hint of `kernels`, which is safe to call.

use super::kernels::prefetch;

/// Largest feature dimension supported (keys are packed as 16-bit lanes in a u128).
pub(super) const MAX_D: usize = 7;

/// Open-addressing table (linear probing, keys stored inline so a probe is one cache line)
/// from lattice keys to vertex ids. Ids are given in insertion order, as in pydensecrf's
/// HashTable; they never influence a number, only memory order.
#[derive(Clone, Copy)]
struct Slot {
    lo: u64,
    hi: u64,
    id: u32,
}

const EMPTY: u32 = u32::MAX;

pub(super) struct KeyTable {
    slots: Vec<Slot>,
    pub(super) keys: Vec<u128>, // per vertex
    pub(super) mask: usize,
    /// One bit per (high hash bits): a cache-resident presence filter that answers most
    /// lookups of absent neighbours without touching the (large) slot array.
    bits: Vec<u64>,
    bits_shift: u32,
}

impl KeyTable {
    pub(super) fn new(expected: usize) -> Self {
        let cap = (expected + expected / 2).next_power_of_two().max(16);
        KeyTable {
            slots: vec![Slot { lo: 0, hi: 0, id: EMPTY }; cap],
            keys: Vec::with_capacity(expected),
            mask: cap - 1,
            bits: Vec::new(),
            bits_shift: 64,
        }
    }
    /// Build the presence filter once all keys are in (about 8 bits per key).
    pub(super) fn seal(&mut self) {
        let nbits = (self.keys.len() * 8).next_power_of_two().max(64);
        self.bits_shift = 64 - nbits.trailing_zeros();
        self.bits = vec![0u64; nbits / 64];
        for &k in &self.keys {
            let b = (Self::hash(k) as u64 >> self.bits_shift) as usize;
            self.bits[b / 64] |= 1 << (b % 64);
        }
    }
    /// Prefetch the slot a key with hash `h` starts probing at.
    #[inline]
    pub(super) fn prefetch(&self, h: usize) {
        prefetch(self.slots.as_ptr().wrapping_add(h & self.mask));
    }
    /// Prefetch the presence filter's word for hash `h`.
    #[inline]
    pub(super) fn prefetch_filter(&self, h: usize) {
        let b = (h as u64 >> self.bits_shift) as usize;
        prefetch(self.bits.as_ptr().wrapping_add(b / 64));
    }
    #[inline]
    pub(super) fn maybe_present(&self, h: usize) -> bool {
        let b = (h as u64 >> self.bits_shift) as usize;
        self.bits[b / 64] & (1 << (b % 64)) != 0
    }
    #[inline]
    pub(super) fn hash(k: u128) -> usize {
        // MurmurHash3's fmix64: every key bit reaches the low bits used as the slot index.
        let mut h = (k as u64) ^ ((k >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h as usize
    }
    /// Look up `k` whose hash (masked) is `h`.
    #[inline]
    pub(super) fn find_from(&self, k: u128, mut h: usize) -> Option<u32> {
        let (lo, hi) = (k as u64, (k >> 64) as u64);
        loop {
            let s = self.slots[h];
            if s.id == EMPTY {
                return None;
            }
            if s.lo == lo && s.hi == hi {
                return Some(s.id);
            }
            h = (h + 1) & self.mask;
        }
    }
    #[inline]
    pub(super) fn insert(&mut self, k: u128) -> u32 {
        self.insert_hashed(k, Self::hash(k))
    }
    /// Insert `k` whose (unmasked) hash is `hash`.
    #[inline]
    pub(super) fn insert_hashed(&mut self, k: u128, hash: usize) -> u32 {
        // keep the load factor below 0.6
        if 5 * (self.keys.len() + 1) > 3 * self.slots.len() {
            self.grow();
        }
        let (lo, hi) = (k as u64, (k >> 64) as u64);
        let mut h = hash & self.mask;
        loop {
            let s = self.slots[h];
            if s.id == EMPTY {
                let id = self.keys.len() as u32;
                self.keys.push(k);
                self.slots[h] = Slot { lo, hi, id };
                return id;
            }
            if s.lo == lo && s.hi == hi {
                return s.id;
            }
            h = (h + 1) & self.mask;
        }
    }
    fn grow(&mut self) {
        let cap = self.slots.len() * 2;
        self.slots = vec![Slot { lo: 0, hi: 0, id: EMPTY }; cap];
        self.mask = cap - 1;
        for (i, &k) in self.keys.iter().enumerate() {
            let mut h = Self::hash(k) & self.mask;
            while self.slots[h].id != EMPTY {
                h = (h + 1) & self.mask;
            }
            self.slots[h] = Slot { lo: k as u64, hi: (k >> 64) as u64, id: i as u32 };
        }
    }
}

#[inline]
pub(super) fn pack_key(key: &[i16]) -> u128 {
    let mut k = 0u128;
    for (i, &v) in key.iter().enumerate() {
        k |= ((v as u16) as u128) << (16 * i);
    }
    k
}

#[inline]
pub(super) fn unpack_key(k: u128, d: usize, out: &mut [i16; MAX_D + 1]) {
    for (i, o) in out.iter_mut().enumerate().take(d) {
        *o = (k >> (16 * i)) as u16 as i16;
    }
}
