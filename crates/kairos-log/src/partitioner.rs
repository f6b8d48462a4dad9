//! Key → partition mapping.
//!
//! The mapping is part of the on-disk contract: a key must land in the same
//! partition forever, otherwise per-key ordering breaks across restarts. It
//! is therefore a fixed algorithm, not `std`'s randomly seeded hasher:
//! the 32-bit MurmurHash2 variant used by Apache Kafka's default partitioner
//! (`Utils.murmur2`, seed `0x9747b28c`), with the sign bit cleared and taken
//! modulo the partition count — `(murmur2(key) & 0x7fffffff) % partitions`.
//! Using Kafka's exact function means a future Kafka backend places every key
//! in the same partition number as the embedded log does.

/// Kafka's `Utils.murmur2`: 32-bit MurmurHash2 with seed `0x9747b28c`,
/// reading 4-byte little-endian blocks. Returned as the unsigned bit pattern
/// of Java's `int` result.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java computes `seed ^ length` on 32-bit ints; truncation is intended.
    let mut h = SEED ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` in a log with `partitions` partitions:
/// `(murmur2(key) & 0x7fffffff) % partitions` (Kafka's default partitioner
/// for keyed records). A `partitions` of 0 is treated as 1.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafka_reference_vectors() {
        // From Apache Kafka's UtilsTest.testMurmur2 (Java signed ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key) as i32, expected, "key {key:?}");
        }
    }

    #[test]
    fn partition_is_in_range_and_stable() {
        for n in 1..20u32 {
            for i in 0..200u32 {
                let key = format!("user-{i}");
                let p = partition_for(key.as_bytes(), n);
                assert!(p < n);
                assert_eq!(p, partition_for(key.as_bytes(), n));
            }
        }
        assert_eq!(partition_for(b"anything", 0), 0);
        // Pinned so an accidental algorithm change is caught.
        assert_eq!(
            partition_for(b"21", 4),
            (-973_932_308i32 as u32 & 0x7fff_ffff) % 4
        );
    }
}
