//! The key table of the permutohedral lattice (pydensecrf permutohedral.cpp's `HashTable`),
//! and the packing of lattice keys: into a `u128` up to 7 coordinates (every kernel of the
//! CLIP-ES CRF), into a [`WideKey`] of two up to [`MAX_D`] (the general engine's features).
//!
//! It owns the map from a vertex's key to its id, which only the bilateral (hashed) lattice
//! needs: the Gaussian kernel's lattice indexes its small key box densely instead
//! (`Lattice::new_dense2`). Vertex ids never influence a number, only memory order. Its own
//! accesses are bounds-checked; it uses the prefetch hint of `kernels`, which is safe to call.

use super::kernels::prefetch;

/// Largest feature dimension supported (keys are packed as 16-bit lanes, as pydensecrf's
/// `short` keys, in a u128 up to [`NARROW_D`] and in a [`WideKey`] up to this).
pub(super) const MAX_D: usize = 16;
/// Largest feature dimension whose keys fit a u128.
pub(super) const NARROW_D: usize = 7;

/// A packed lattice key: d coordinates as 16-bit lanes. Generic so that the common case keeps
/// its 16-byte keys and 24-byte slots, while features of up to [`MAX_D`] dimensions still work.
pub(super) trait LatticeKey: Copy + Default + Eq {
    /// The key as the slot stores it (u64 words: slots stay 8-byte aligned).
    type Words: Copy + PartialEq + Default;
    fn words(self) -> Self::Words;
    fn pack(key: &[i16]) -> Self;
    /// The first d coordinates into `out`.
    fn unpack(self, d: usize, out: &mut [i16; MAX_D + 1]);
    fn hash(self) -> usize;
    /// The keys as u128 when that is what they are (the vectorised simplex writes those).
    fn as_u128(keys: &mut [Self]) -> Option<&mut [u128]>;
}

impl LatticeKey for u128 {
    type Words = [u64; 2];
    #[inline]
    fn words(self) -> [u64; 2] {
        [self as u64, (self >> 64) as u64]
    }
    #[inline]
    fn pack(key: &[i16]) -> u128 {
        pack_key(key)
    }
    #[inline]
    fn unpack(self, d: usize, out: &mut [i16; MAX_D + 1]) {
        unpack_key(self, d, out)
    }
    #[inline]
    fn hash(self) -> usize {
        fmix(self)
    }
    fn as_u128(keys: &mut [u128]) -> Option<&mut [u128]> {
        Some(keys)
    }
}

/// A key of up to [`MAX_D`] coordinates: lanes 0..8 in the first u128, 8..16 in the second.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct WideKey([u128; 2]);

impl LatticeKey for WideKey {
    type Words = [u64; 4];
    #[inline]
    fn words(self) -> [u64; 4] {
        let [a, b] = self.0;
        [a as u64, (a >> 64) as u64, b as u64, (b >> 64) as u64]
    }
    #[inline]
    fn pack(key: &[i16]) -> WideKey {
        let (lo, hi) = key.split_at(key.len().min(8));
        WideKey([pack_key(lo), pack_key(hi)])
    }
    #[inline]
    fn unpack(self, d: usize, out: &mut [i16; MAX_D + 1]) {
        for (i, o) in out.iter_mut().enumerate().take(d) {
            *o = (self.0[i / 8] >> (16 * (i % 8))) as u16 as i16;
        }
    }
    #[inline]
    fn hash(self) -> usize {
        fmix(self.0[1] ^ fmix(self.0[0]) as u128)
    }
    fn as_u128(_: &mut [WideKey]) -> Option<&mut [u128]> {
        None
    }
}

/// MurmurHash3's fmix64 over a u128: every key bit reaches the low bits used as the slot index.
#[inline]
fn fmix(k: u128) -> usize {
    let mut h = (k as u64) ^ ((k >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as usize
}

/// Open-addressing table (linear probing, keys stored inline so a probe is one cache line)
/// from lattice keys to vertex ids. Ids are given in insertion order, as in pydensecrf's
/// HashTable; they never influence a number, only memory order.
#[derive(Clone, Copy)]
struct Slot<W> {
    key: W,
    id: u32,
}

const EMPTY: u32 = u32::MAX;

pub(super) struct KeyTable<K: LatticeKey> {
    slots: Vec<Slot<K::Words>>,
    pub(super) keys: Vec<K>, // per vertex
    pub(super) mask: usize,
    /// One bit per (high hash bits): a cache-resident presence filter that answers most
    /// lookups of absent neighbours without touching the (large) slot array.
    bits: Vec<u64>,
    bits_shift: u32,
}

impl<K: LatticeKey> KeyTable<K> {
    pub(super) fn new(expected: usize) -> Self {
        let cap = (expected + expected / 2).next_power_of_two().max(16);
        KeyTable {
            slots: vec![Slot { key: K::Words::default(), id: EMPTY }; cap],
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
            let b = (k.hash() as u64 >> self.bits_shift) as usize;
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
    /// Look up `k` whose hash (masked) is `h`.
    #[inline]
    pub(super) fn find_from(&self, k: K, mut h: usize) -> Option<u32> {
        let key = k.words();
        loop {
            let s = self.slots[h];
            if s.id == EMPTY {
                return None;
            }
            if s.key == key {
                return Some(s.id);
            }
            h = (h + 1) & self.mask;
        }
    }
    #[inline]
    pub(super) fn insert(&mut self, k: K) -> u32 {
        self.insert_hashed(k, k.hash())
    }
    /// Insert `k` whose (unmasked) hash is `hash`.
    #[inline]
    pub(super) fn insert_hashed(&mut self, k: K, hash: usize) -> u32 {
        // keep the load factor below 0.6
        if 5 * (self.keys.len() + 1) > 3 * self.slots.len() {
            self.grow();
        }
        let key = k.words();
        let mut h = hash & self.mask;
        loop {
            let s = self.slots[h];
            if s.id == EMPTY {
                let id = self.keys.len() as u32;
                self.keys.push(k);
                self.slots[h] = Slot { key, id };
                return id;
            }
            if s.key == key {
                return s.id;
            }
            h = (h + 1) & self.mask;
        }
    }
    fn grow(&mut self) {
        let cap = self.slots.len() * 2;
        self.slots = vec![Slot { key: K::Words::default(), id: EMPTY }; cap];
        self.mask = cap - 1;
        for (i, &k) in self.keys.iter().enumerate() {
            let mut h = k.hash() & self.mask;
            while self.slots[h].id != EMPTY {
                h = (h + 1) & self.mask;
            }
            self.slots[h] = Slot { key: k.words(), id: i as u32 };
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
