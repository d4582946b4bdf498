//! RFC 6962 Merkle trees over audit entries: leaf and node hashes, the root of a
//! growing log kept in O(log n) memory ([`CompactRange`]), and inclusion and
//! consistency proofs (built and checked by the `ct-merkle` crate, checked here
//! against the Certificate Transparency known answers).
//!
//! Leaf hash `SHA-256(0x00 ‖ canonical event bytes)`, node hash
//! `SHA-256(0x01 ‖ left ‖ right)`, the empty tree's hash is `SHA-256("")`, and a
//! tree of n leaves splits at the largest power of two below n (RFC 6962 §2.1).

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use sha2::{Digest as _, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree, `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest
/// first. Appending is amortised O(1), the root O(log n), memory O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    // (height, hash) of each perfect subtree, left to right.
    peaks: Vec<(u32, Hash)>,
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf by its leaf hash.
    pub fn push_leaf_hash(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.peaks.last() {
            if height != node.0 {
                break;
            }
            self.peaks.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The Merkle tree hash of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

impl CompactRange {
    /// The right edge of a tree of `size` leaves from its perfect subtree roots,
    /// largest first (one per set bit of `size`, as [`CompactRange::frontier`]
    /// gives them). Fails if the count does not match `size`.
    pub fn from_frontier(size: u64, frontier: &[Hash]) -> Result<Self, ProofError> {
        let heights: Vec<u32> = (0..64u32).rev().filter(|h| size >> h & 1 == 1).collect();
        if heights.len() != frontier.len() {
            return Err(ProofError(format!(
                "a tree of {size} leaves has {} frontier hashes, not {}",
                heights.len(),
                frontier.len()
            )));
        }
        Ok(Self {
            size,
            peaks: heights.into_iter().zip(frontier.iter().copied()).collect(),
        })
    }

    /// The roots of the perfect subtrees, largest (leftmost) first: with the
    /// size, everything needed to extend the tree and compute its roots.
    pub fn frontier(&self) -> Vec<Hash> {
        self.peaks.iter().map(|(_, h)| *h).collect()
    }
}

/// A tree whose first leaves may be pruned: the pruned prefix is represented by
/// its right edge (the [`CompactRange`] frontier at the prune point), the rest
/// by its leaves. Roots, inclusion proofs of retained leaves and consistency
/// proofs from sizes at or after the prune point need nothing else (each node
/// RFC 6962 needs left of the prune point is one of the frontier's subtrees).
/// Without a pruned prefix it is an ordinary tree; it agrees with [`Tree`]
/// (tested for every size and prune point up to 40).
#[derive(Debug, Clone, Default)]
pub struct PartialTree {
    pruned: u64,
    // (start, end, hash) of the pruned prefix's perfect subtrees.
    peaks: Vec<(u64, u64, Hash)>,
    // levels[h] = (first node index, hashes of the perfect subtrees of 2^h
    // retained leaves from that index on).
    levels: Vec<(u64, Vec<Hash>)>,
    size: u64,
}

impl PartialTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree whose first `size` leaves are pruned, known by their frontier.
    pub fn from_frontier(size: u64, frontier: &[Hash]) -> Result<Self, ProofError> {
        let range = CompactRange::from_frontier(size, frontier)?;
        let mut start = 0u64;
        let mut peaks = Vec::with_capacity(range.peaks.len());
        for (h, hash) in &range.peaks {
            let end = start + (1u64 << h);
            peaks.push((start, end, *hash));
            start = end;
        }
        Ok(Self {
            pruned: size,
            peaks,
            levels: Vec::new(),
            size,
        })
    }

    /// Leaves so far, pruned ones included.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether it has no leaf.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The first retained leaf index (the prune point).
    pub fn first(&self) -> u64 {
        self.pruned
    }

    /// Appends a leaf (its canonical bytes).
    pub fn push(&mut self, leaf: &[u8]) {
        self.push_leaf_hash(leaf_hash(leaf));
    }

    /// Appends a leaf by its leaf hash.
    pub fn push_leaf_hash(&mut self, leaf: Hash) {
        let mut index = self.size;
        let mut node = leaf;
        let mut h = 0usize;
        loop {
            if self.levels.len() <= h {
                // The first node of a level: the first one wholly after the prune point.
                let first = self.pruned.div_ceil(1u64 << h);
                self.levels.push((first, Vec::new()));
            }
            let (first, nodes) = &mut self.levels[h];
            if index != *first + nodes.len() as u64 {
                break;
            }
            nodes.push(node);
            if index.is_multiple_of(2) || index - 1 < *first {
                break;
            }
            let left = nodes[(index - 1 - *first) as usize];
            node = node_hash(&left, &node);
            index /= 2;
            h += 1;
        }
        self.size += 1;
    }

    fn perfect(&self, a: u64, b: u64) -> Option<Hash> {
        if let Some((_, _, h)) = self.peaks.iter().find(|(s, e, _)| *s == a && *e == b) {
            return Some(*h);
        }
        let width = b - a;
        if a < self.pruned || !width.is_power_of_two() || !a.is_multiple_of(width) {
            return None;
        }
        let (first, nodes) = self.levels.get(width.trailing_zeros() as usize)?;
        let i = (a / width).checked_sub(*first)?;
        nodes.get(usize::try_from(i).ok()?).copied()
    }

    /// MTH(D[a:b]), RFC 6962 §2.1.
    fn mth(&self, a: u64, b: u64) -> Result<Hash, ProofError> {
        if a >= b {
            return Ok(empty_root());
        }
        if let Some(h) = self.perfect(a, b) {
            return Ok(h);
        }
        if b - a == 1 {
            return Err(ProofError(format!("leaf {a} is pruned")));
        }
        let k = split_point(b - a);
        Ok(node_hash(&self.mth(a, a + k)?, &self.mth(a + k, b)?))
    }

    /// The root of the first `size` leaves (at least the prune point).
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        if size > self.size || (size < self.pruned && size > 0) {
            return Err(ProofError(format!("no root of size {size}")));
        }
        self.mth(0, size)
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        self.mth(0, self.size).unwrap_or_else(|_| empty_root())
    }

    /// The inclusion proof of retained leaf `index` in the tree of the first
    /// `size` leaves (audit path, leaf side first; RFC 6962 §2.1.1).
    pub fn inclusion_proof_at(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        if index < self.pruned || index >= size || size > self.size {
            return Err(ProofError(format!(
                "no inclusion proof of leaf {index} in a tree of {size} (retained from {})",
                self.pruned
            )));
        }
        let mut path = Vec::new();
        let (mut a, mut b) = (0u64, size);
        // From the root down; the path is leaf side first, so reverse at the end.
        while b - a > 1 {
            let k = split_point(b - a);
            if index < a + k {
                path.push(self.mth(a + k, b)?);
                b = a + k;
            } else {
                path.push(self.mth(a, a + k)?);
                a += k;
            }
        }
        path.reverse();
        Ok(path)
    }

    /// The inclusion proof of retained leaf `index` in the whole tree.
    pub fn inclusion_proof(&self, index: u64) -> Result<Vec<Hash>, ProofError> {
        self.inclusion_proof_at(index, self.size)
    }

    /// The consistency proof from the first `old_size` leaves (at least the
    /// prune point) to the whole tree (RFC 6962 §2.1.2).
    pub fn consistency_proof(&self, old_size: u64) -> Result<Vec<Hash>, ProofError> {
        if old_size == 0 || old_size > self.size || old_size < self.pruned {
            return Err(ProofError(format!(
                "no consistency proof from size {old_size} to {}",
                self.size
            )));
        }
        let mut path = Vec::new();
        let (mut a, mut b, mut m, mut whole) = (0u64, self.size, old_size, true);
        while m != b - a {
            let k = split_point(b - a);
            if m <= k {
                path.push(self.mth(a + k, b)?);
                b = a + k;
            } else {
                path.push(self.mth(a, a + k)?);
                a += k;
                m -= k;
                whole = false;
            }
        }
        if !whole {
            path.push(self.mth(a, b)?);
        }
        path.reverse();
        Ok(path)
    }
}

/// The largest power of two smaller than `n` (n > 1).
fn split_point(n: u64) -> u64 {
    let p = 1u64 << (63 - (n - 1).leading_zeros());
    if p == n {
        p / 2
    } else {
        p
    }
}

/// A whole tree in memory (verification and proofs), over canonical event bytes.
#[derive(Debug, Default)]
pub struct Tree(MemoryBackedTree<Sha256, Vec<u8>>);

/// A proof could not be built or did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofError(pub String);

impl std::fmt::Display for ProofError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProofError {}

fn root_of(hash: &Hash, size: u64) -> RootHash<Sha256> {
    RootHash::new((*hash).into(), size)
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf (its canonical bytes).
    pub fn push(&mut self, leaf: Vec<u8>) {
        self.0.push(leaf);
    }

    /// Leaves so far.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether it has no leaf.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The root hash of the whole tree.
    pub fn root(&self) -> Hash {
        if self.0.is_empty() {
            return empty_root();
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.root().as_bytes().as_slice());
        out
    }

    /// The inclusion proof of leaf `index` in the whole tree (audit path,
    /// leaf-side first).
    pub fn inclusion_proof(&self, index: u64) -> Result<Vec<Hash>, ProofError> {
        if index >= self.len() {
            return Err(ProofError(format!(
                "index {index} is not in a tree of {}",
                self.len()
            )));
        }
        let idx = usize::try_from(index).map_err(|_| ProofError("index too large".into()))?;
        Ok(split(self.0.prove_inclusion(idx).as_bytes()))
    }

    /// The consistency proof from the first `old_size` leaves to the whole tree.
    pub fn consistency_proof(&self, old_size: u64) -> Result<Vec<Hash>, ProofError> {
        if old_size == 0 || old_size > self.len() {
            return Err(ProofError(format!(
                "no consistency proof from size {old_size} to {}",
                self.len()
            )));
        }
        if old_size == self.len() {
            return Ok(Vec::new());
        }
        let additions = usize::try_from(self.len() - old_size)
            .map_err(|_| ProofError("tree too large".into()))?;
        Ok(split(self.0.prove_consistency(additions).as_bytes()))
    }
}

fn split(bytes: &[u8]) -> Vec<Hash> {
    bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect()
}

fn join(path: &[Hash]) -> Vec<u8> {
    path.iter().flat_map(|h| h.iter().copied()).collect()
}

/// Checks that `leaf` (canonical bytes) is leaf `index` of the tree of `size`
/// leaves whose root is `root`.
pub fn verify_inclusion(
    root: &Hash,
    size: u64,
    index: u64,
    leaf: &[u8],
    path: &[Hash],
) -> Result<(), ProofError> {
    let proof = InclusionProof::<Sha256>::try_from_bytes(join(path))
        .map_err(|e| ProofError(e.to_string()))?;
    root_of(root, size)
        .verify_inclusion(&leaf, index, &proof)
        .map_err(|e| ProofError(format!("inclusion proof: {e}")))
}

/// Checks that the tree (`old_root`, `old_size`) is a prefix of (`new_root`,
/// `new_size`).
pub fn verify_consistency(
    old_root: &Hash,
    old_size: u64,
    new_root: &Hash,
    new_size: u64,
    path: &[Hash],
) -> Result<(), ProofError> {
    if old_size == new_size {
        return if old_root == new_root && path.is_empty() {
            Ok(())
        } else {
            Err(ProofError("equal sizes with different roots".into()))
        };
    }
    let proof = ConsistencyProof::<Sha256>::try_from_bytes(join(path))
        .map_err(|e| ProofError(e.to_string()))?;
    root_of(new_root, new_size)
        .verify_consistency(&root_of(old_root, old_size), &proof)
        .map_err(|e| ProofError(format!("consistency proof: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // The Certificate Transparency reference vectors (transparency-dev/merkle
    // testonly/reference_test.go, also in certificate-transparency-go): the eight
    // leaves below and the roots of their prefixes.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn leaf(i: usize) -> Vec<u8> {
        data_encoding::HEXLOWER
            .decode(LEAVES[i].as_bytes())
            .unwrap()
    }

    fn h(s: &str) -> Hash {
        let v = data_encoding::HEXLOWER.decode(s.as_bytes()).unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn roots_match_the_ct_reference_vectors() {
        assert_eq!(hex(&empty_root()), EMPTY);
        assert_eq!(hex(&CompactRange::new().root()), EMPTY);
        assert_eq!(hex(&Tree::new().root()), EMPTY);
        let mut range = CompactRange::new();
        let mut tree = Tree::new();
        for (i, want) in ROOTS.iter().enumerate() {
            range.push_leaf_hash(leaf_hash(&leaf(i)));
            tree.push(leaf(i));
            assert_eq!(hex(&range.root()), *want, "compact range, size {}", i + 1);
            assert_eq!(hex(&tree.root()), *want, "tree, size {}", i + 1);
        }
    }

    #[test]
    fn inclusion_and_consistency_match_the_reference_vectors() {
        let mut tree = Tree::new();
        for i in 0..8 {
            tree.push(leaf(i));
        }
        // Inclusion of leaf 0 in the 8-leaf tree (reference_test.go).
        let path = tree.inclusion_proof(0).unwrap();
        let want = [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ];
        assert_eq!(path.iter().map(|p| hex(p)).collect::<Vec<_>>(), want);
        // Consistency 1 -> 8, 6 -> 8, 2 -> 5 (reference_test.go).
        let mut t5 = Tree::new();
        for i in 0..5 {
            t5.push(leaf(i));
        }
        let c = |t: &Tree, m: u64| {
            t.consistency_proof(m)
                .unwrap()
                .iter()
                .map(|p| hex(p))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            c(&tree, 1),
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ]
        );
        assert_eq!(
            c(&tree, 6),
            [
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ]
        );
        assert_eq!(
            c(&t5, 2),
            [
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ]
        );
        // Every proof of every prefix verifies, and fails for a wrong leaf or root.
        for n in 1..=8u64 {
            let mut t = Tree::new();
            for i in 0..n as usize {
                t.push(leaf(i));
            }
            let root = h(ROOTS[n as usize - 1]);
            for i in 0..n {
                let path = t.inclusion_proof(i).unwrap();
                verify_inclusion(&root, n, i, &leaf(i as usize), &path).unwrap();
                assert!(verify_inclusion(&root, n, i, b"other", &path).is_err());
                assert!(verify_inclusion(&h(EMPTY), n, i, &leaf(i as usize), &path).is_err());
            }
            for m in 1..=n {
                let path = t.consistency_proof(m).unwrap();
                let old = h(ROOTS[m as usize - 1]);
                verify_consistency(&old, m, &root, n, &path).unwrap();
                if m < n {
                    assert!(verify_consistency(&h(EMPTY), m, &root, n, &path).is_err());
                }
            }
        }
    }

    #[test]
    fn partial_trees_agree_with_the_full_tree_for_every_prune_point() {
        let data = |i: u64| i.to_be_bytes().to_vec();
        for n in 0u64..=40 {
            let mut tree = Tree::new();
            let mut range = CompactRange::new();
            for i in 0..n {
                tree.push(data(i));
            }
            for p in 0..=n {
                if p > 0 {
                    range = CompactRange::new();
                    for i in 0..p {
                        range.push_leaf_hash(leaf_hash(&data(i)));
                    }
                }
                let back = CompactRange::from_frontier(p, &range.frontier()).unwrap();
                assert_eq!(back.root(), range.root());
                let mut part = if p == 0 {
                    PartialTree::new()
                } else {
                    PartialTree::from_frontier(p, &range.frontier()).unwrap()
                };
                for i in p..n {
                    part.push(&data(i));
                }
                assert_eq!(part.len(), n);
                assert_eq!(part.root(), tree.root(), "n {n} p {p}");
                for j in p..n {
                    assert_eq!(
                        part.inclusion_proof(j).unwrap(),
                        tree.inclusion_proof(j).unwrap(),
                        "inclusion n {n} p {p} j {j}"
                    );
                }
                for m in p.max(1)..=n {
                    assert_eq!(
                        part.consistency_proof(m).unwrap(),
                        tree.consistency_proof(m).unwrap(),
                        "consistency n {n} p {p} m {m}"
                    );
                    let mut t = Tree::new();
                    for i in 0..m {
                        t.push(data(i));
                    }
                    assert_eq!(part.root_at(m).unwrap(), t.root());
                    if m > p {
                        assert_eq!(
                            part.inclusion_proof_at(m - 1, m).unwrap(),
                            t.inclusion_proof(m - 1).unwrap()
                        );
                    }
                }
                if p > 0 {
                    assert!(part.inclusion_proof(p - 1).is_err());
                }
            }
        }
        assert!(CompactRange::from_frontier(3, &[[0u8; 32]]).is_err());
    }

    #[test]
    fn compact_range_matches_the_full_tree_up_to_300_leaves() {
        let mut range = CompactRange::new();
        let mut tree = Tree::new();
        for i in 0u32..300 {
            let data = i.to_be_bytes().to_vec();
            range.push_leaf_hash(leaf_hash(&data));
            tree.push(data);
            assert_eq!(range.root(), tree.root(), "size {}", i + 1);
            assert_eq!(range.size(), tree.len());
        }
    }
}
