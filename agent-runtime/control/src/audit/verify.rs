//! Verifying a log offline: its entries and checkpoints as stored, the checkpoint
//! key, and nothing else. Used by `agentbus audit verify` (after fetching the raw
//! entries through the controller) and by the tests.

use serde::{Deserialize, Serialize};

use super::event::AuditEvent;
use super::merkle::{self, Hash, PartialTree};
use super::note::{Checkpoint, Verifier};

/// One stored entry: its stream sequence and its bytes as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The stream sequence it was read at.
    pub seq: u64,
    /// The stored bytes.
    pub data: Vec<u8>,
}

/// One stored checkpoint: its stream sequence and its note text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The stream sequence it was read at.
    pub seq: u64,
    /// The signed note.
    pub note: String,
}

/// The retention anchor of a pruned log: the signed checkpoint at the prune
/// point and the right edge (frontier) of its tree, from which the retained
/// entries' tree is recomputed. Stored as JSON on
/// `agentbus.audit.v1.anchor.<log>`; only the newest one counts. The frontier
/// needs no signature: it must hash to the signed root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The signed checkpoint (C2SP note) whose size is the prune point: entries
    /// below it are pruned.
    pub checkpoint: String,
    /// The roots of the perfect subtrees of that tree, hex, largest first.
    pub frontier: Vec<String>,
    /// The retention cutoff applied, Unix ms (entries older were eligible).
    pub cutoff_ms: u64,
    /// When the prune was done, Unix ms.
    pub pruned_at_ms: u64,
}

/// Hashes from hex, each 32 bytes.
pub fn parse_hashes(hexes: &[String]) -> Option<Vec<Hash>> {
    hexes
        .iter()
        .map(|h| {
            data_encoding::HEXLOWER
                .decode(h.as_bytes())
                .ok()
                .and_then(|v| <Hash>::try_from(v).ok())
        })
        .collect()
}

/// An anchor checked against `verifier` and `origin`: its checkpoint and the
/// tree of the pruned prefix.
pub fn check_anchor(
    anchor: &StoredEntry,
    origin: &str,
    verifier: &Verifier,
) -> Result<(Anchor, Checkpoint, PartialTree), VerifyFailure> {
    let bad = |why: String| {
        fail(
            None,
            Some(anchor.seq),
            format!("retention anchor at stream seq {}: {why}", anchor.seq),
        )
    };
    let parsed: Anchor =
        serde_json::from_slice(&anchor.data).map_err(|e| bad(format!("not an anchor: {e}")))?;
    let cp = verifier
        .verify(&parsed.checkpoint)
        .map_err(|e| bad(e.to_string()))?;
    if cp.origin != origin {
        return Err(bad(format!("is for {:?}, not {origin:?}", cp.origin)));
    }
    let frontier =
        parse_hashes(&parsed.frontier).ok_or_else(|| bad("frontier is not hex hashes".into()))?;
    let tree = PartialTree::from_frontier(cp.size, &frontier).map_err(|e| bad(e.0))?;
    if tree.root() != cp.root {
        return Err(bad(format!(
            "its frontier does not hash to the signed root of size {}",
            cp.size
        )));
    }
    Ok((parsed, cp, tree))
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The log (tenant id or `_platform`).
    pub log: String,
    /// The first entry checked: 0, or the prune point of a pruned log (entries
    /// below it were removed by retention; their tree is the anchor's signed
    /// checkpoint).
    #[serde(default)]
    pub first_index: u64,
    /// Entries checked (indexes `first_index..first_index + entries`).
    pub entries: u64,
    /// The signing time of the retention anchor's checkpoint, Unix ms, if the
    /// log was pruned.
    #[serde(default)]
    pub anchor_time_ms: Option<u64>,
    /// When the log was last pruned, Unix ms, if it was.
    #[serde(default)]
    pub pruned_at_ms: Option<u64>,
    /// Checkpoints checked (signature, root, consistency with the previous one).
    pub checkpoints: u64,
    /// The largest checkpointed size: entries below it are covered by a signature.
    pub signed_size: u64,
    /// Entries after the last checkpoint (chained, not yet signed).
    pub unsigned_tail: u64,
    /// The recomputed root of all entries (hex).
    pub root: String,
    /// Inclusion proofs checked (each entry in the first checkpoint covering it).
    pub inclusion_proofs: u64,
    /// Consistency proofs checked (between consecutive checkpoints).
    pub consistency_proofs: u64,
}

/// Why a log does not verify: the first bad entry (by index) or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyFailure {
    /// The index of the first bad or missing entry, when an entry is to blame.
    pub index: Option<u64>,
    /// The stream sequence of the offending message, when there is one.
    pub seq: Option<u64>,
    /// One line.
    pub message: String,
}

impl std::fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VerifyFailure {}

fn fail(index: Option<u64>, seq: Option<u64>, message: String) -> VerifyFailure {
    VerifyFailure {
        index,
        seq,
        message,
    }
}

/// Verifies the log `log` whose checkpoints name `origin`: every checkpoint's
/// signature by `verifier`, every entry's form, index and chain, every
/// checkpoint's root against the recomputed tree, an inclusion proof for every
/// entry and a consistency proof between consecutive checkpoints. Returns the
/// first failure, naming the entry.
pub fn verify_log(
    log: &str,
    origin: &str,
    verifier: &Verifier,
    entries: &[StoredEntry],
    checkpoints: &[StoredCheckpoint],
) -> Result<VerifyReport, VerifyFailure> {
    verify_retained(log, origin, verifier, None, entries, checkpoints)
}

/// [`verify_log`] of a log that may have been pruned: with an `anchor` (the
/// newest stored on the log's anchor subject), verification starts from the
/// anchor's signed checkpoint and frontier; entries below the prune point
/// still stored (a prune interrupted) and checkpoints smaller than it are
/// skipped, a checkpoint of exactly its size must carry its root, and the
/// first retained entry's `prev` (the hash of a pruned entry) is covered by the
/// consistency proof from the anchor to the next checkpoint instead.
pub fn verify_retained(
    log: &str,
    origin: &str,
    verifier: &Verifier,
    anchor: Option<&StoredEntry>,
    entries: &[StoredEntry],
    checkpoints: &[StoredCheckpoint],
) -> Result<VerifyReport, VerifyFailure> {
    let (mut tree, anchored, anchor_info) = match anchor {
        Some(a) => {
            let (parsed, cp, tree) = check_anchor(a, origin, verifier)?;
            let info = (cp.time_ms, parsed.pruned_at_ms);
            (tree, Some((cp.size, cp.root)), Some(info))
        }
        None => (PartialTree::new(), None, None),
    };
    let first = tree.first();
    // Entries below the prune point still stored (an interrupted prune).
    let skip = entries
        .iter()
        .take_while(|e| AuditEvent::decode(&e.data).is_ok_and(|ev| ev.index < first))
        .count();
    let entries = &entries[skip..];
    // Checkpoints first: every one must carry our signature and name this log,
    // and sizes never go back.
    let mut signed: Vec<(u64, Checkpoint)> = Vec::with_capacity(checkpoints.len());
    for c in checkpoints {
        let cp = verifier.verify(&c.note).map_err(|e| {
            fail(
                None,
                Some(c.seq),
                format!("checkpoint at stream seq {}: {e}", c.seq),
            )
        })?;
        if cp.origin != origin {
            return Err(fail(
                None,
                Some(c.seq),
                format!(
                    "checkpoint at stream seq {} is for {:?}, not {origin:?}",
                    c.seq, cp.origin
                ),
            ));
        }
        if let Some((_, last)) = signed.last() {
            if cp.size < last.size {
                return Err(fail(
                    Some(cp.size),
                    Some(c.seq),
                    format!(
                        "checkpoint at stream seq {} has size {} after one of size {} (rolled back)",
                        c.seq, cp.size, last.size
                    ),
                ));
            }
        }
        signed.push((c.seq, cp));
    }
    // Checkpoints of the pruned prefix: superseded by the anchor, except that
    // one of its very size must agree with it.
    let mut next_cp = 0usize;
    while let Some((cp_seq, cp)) = signed.get(next_cp) {
        if cp.size > first {
            break;
        }
        if cp.size == first && anchored.is_some_and(|(_, root)| root != cp.root) {
            return Err(fail(
                None,
                Some(*cp_seq),
                format!(
                    "checkpoint at stream seq {cp_seq} (size {first}) does not match the retention anchor"
                ),
            ));
        }
        next_cp += 1;
    }
    let mut prev: Option<Hash> = None;
    let mut last_matched: Option<(u64, Hash)> = anchored;
    let mut inclusion_proofs = 0u64;
    let mut consistency_proofs = 0u64;
    for (pos, entry) in entries.iter().enumerate() {
        let i = first + pos as u64;
        let event = AuditEvent::decode(&entry.data).map_err(|e| {
            fail(
                Some(i),
                Some(entry.seq),
                format!("entry {i} (stream seq {}) was altered: {e}", entry.seq),
            )
        })?;
        if event.tenant != log {
            return Err(fail(
                Some(i),
                Some(entry.seq),
                format!(
                    "entry {i} (stream seq {}) belongs to log {:?}, not {log:?}",
                    entry.seq, event.tenant
                ),
            ));
        }
        if event.index > i {
            return Err(fail(
                Some(i),
                Some(entry.seq),
                format!(
                    "entry {i} is missing (deleted): stream seq {} holds entry {} next",
                    entry.seq, event.index
                ),
            ));
        }
        if event.index < i {
            return Err(fail(
                Some(event.index),
                Some(entry.seq),
                format!(
                    "entry {} appears again at stream seq {} (rewritten, replayed or reordered)",
                    event.index, entry.seq
                ),
            ));
        }
        let want_prev = prev.map(|h| merkle::hex(&h)).unwrap_or_default();
        // The first retained entry of a pruned log chains to a pruned one.
        if !(i == first && first > 0) && event.prev != want_prev {
            let bad = i.saturating_sub(1);
            return Err(fail(
                Some(bad),
                Some(entry.seq),
                format!(
                    "entry {bad} does not match the hash entry {i} (stream seq {}) records: entry {bad} was altered or entry {i} rewritten",
                    entry.seq
                ),
            ));
        }
        prev = Some(merkle::leaf_hash(&entry.data));
        tree.push(&entry.data);
        let size = i + 1;
        while let Some((cp_seq, cp)) = signed.get(next_cp) {
            if cp.size != size {
                break;
            }
            if tree.root() != cp.root {
                let from = last_matched.map(|(s, _)| s).unwrap_or(0);
                return Err(fail(
                    Some(i),
                    Some(*cp_seq),
                    format!(
                        "entry {i} (or a rewritten run from entry {from} to it) does not match the checkpoint of size {size} signed at stream seq {cp_seq}"
                    ),
                ));
            }
            // The proofs a third party would be given, checked against the
            // signed roots.
            let first_new = last_matched.map(|(s, _)| s).unwrap_or(0);
            for j in first_new..size {
                let path = tree
                    .inclusion_proof(j)
                    .map_err(|e| fail(Some(j), None, e.0))?;
                let leaf = &entries[(j - first) as usize].data;
                merkle::verify_inclusion(&cp.root, size, j, leaf, &path)
                    .map_err(|e| fail(Some(j), None, format!("entry {j}: {e}")))?;
                inclusion_proofs += 1;
            }
            if let Some((old_size, old_root)) = last_matched {
                let path = tree
                    .consistency_proof(old_size)
                    .map_err(|e| fail(None, Some(*cp_seq), e.0))?;
                merkle::verify_consistency(&old_root, old_size, &cp.root, size, &path).map_err(
                    |e| {
                        fail(
                            Some(old_size),
                            Some(*cp_seq),
                            format!("checkpoint at stream seq {cp_seq}: {e}"),
                        )
                    },
                )?;
                consistency_proofs += 1;
            }
            last_matched = Some((size, cp.root));
            next_cp += 1;
        }
    }
    let n = first + entries.len() as u64;
    if let Some((cp_seq, cp)) = signed.get(next_cp) {
        let message = if cp.size > n {
            format!(
                "entries {n} to {} are missing (truncated): the checkpoint at stream seq {cp_seq} covers {} entries",
                cp.size - 1,
                cp.size
            )
        } else {
            format!(
                "checkpoint at stream seq {cp_seq} (size {}) is out of order",
                cp.size
            )
        };
        return Err(fail(Some(n.min(cp.size)), Some(*cp_seq), message));
    }
    let signed_size = last_matched.map(|(s, _)| s).unwrap_or(0);
    Ok(VerifyReport {
        log: log.to_string(),
        first_index: first,
        entries: n - first,
        anchor_time_ms: anchor_info.map(|(t, _)| t),
        pruned_at_ms: anchor_info.map(|(_, t)| t),
        checkpoints: signed.len() as u64,
        signed_size,
        unsigned_tail: n - signed_size,
        root: merkle::hex(&tree.root()),
        inclusion_proofs,
        consistency_proofs,
    })
}

/// An inclusion proof that verifies offline (`agentbus audit proof`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionBundle {
    /// The log.
    pub log: String,
    /// The event's id.
    pub event_id: String,
    /// Its leaf index.
    pub index: u64,
    /// The event's canonical bytes (UTF-8 JSON text).
    pub event: String,
    /// Its leaf hash, hex.
    pub leaf_hash: String,
    /// The size of the checkpointed tree the proof is against.
    pub tree_size: u64,
    /// The audit path, hex, leaf side first.
    pub path: Vec<String>,
    /// The signed checkpoint (C2SP signed note).
    pub checkpoint: String,
    /// The verifier key of the checkpoint signer.
    pub verifier_key: String,
}

/// Checks a bundle: the checkpoint's signature (by `verifier`, or else the key
/// the bundle names: pin the key to trust the answer), that its size is the
/// bundle's, that the event is canonical with this id and index, and the
/// inclusion path. Returns the checkpoint.
pub fn verify_bundle(
    bundle: &InclusionBundle,
    verifier: Option<&Verifier>,
) -> Result<Checkpoint, VerifyFailure> {
    let named: Verifier = bundle
        .verifier_key
        .parse()
        .map_err(|e| fail(None, None, format!("verifier key: {e}")))?;
    let verifier = verifier.unwrap_or(&named);
    let cp = verifier
        .verify(&bundle.checkpoint)
        .map_err(|e| fail(None, None, format!("checkpoint: {e}")))?;
    if cp.size != bundle.tree_size {
        return Err(fail(
            None,
            None,
            "the checkpoint's size is not the proof's".into(),
        ));
    }
    let event = AuditEvent::decode(bundle.event.as_bytes())
        .map_err(|e| fail(Some(bundle.index), None, format!("event: {e}")))?;
    if event.id != bundle.event_id || event.index != bundle.index || event.tenant != bundle.log {
        return Err(fail(
            Some(bundle.index),
            None,
            "the event is not the one the proof names".into(),
        ));
    }
    let path = bundle
        .path
        .iter()
        .map(|h| {
            data_encoding::HEXLOWER
                .decode(h.as_bytes())
                .ok()
                .and_then(|v| <Hash>::try_from(v).ok())
                .ok_or_else(|| fail(None, None, "path hash is not 32 bytes of hex".into()))
        })
        .collect::<Result<Vec<Hash>, _>>()?;
    merkle::verify_inclusion(
        &cp.root,
        cp.size,
        bundle.index,
        bundle.event.as_bytes(),
        &path,
    )
    .map_err(|e| fail(Some(bundle.index), None, e.0))?;
    Ok(cp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::event::{Actor, Outcome, SCHEMA_VERSION};
    use super::super::merkle::{CompactRange, Tree};
    use super::super::note::Signer;
    use super::*;

    const ORIGIN: &str = "agentbus/A/audit/acme";

    fn log_of(n: u64) -> Vec<StoredEntry> {
        let mut prev = String::new();
        (0..n)
            .map(|i| {
                let e = AuditEvent {
                    action: "tenant.update".into(),
                    actor: Actor::controller("c"),
                    controller: "c".into(),
                    id: format!("{i:032x}"),
                    index: i,
                    outcome: Outcome::Allowed,
                    prev: prev.clone(),
                    reason: String::new(),
                    request_id: format!("r{i}"),
                    resource: "tenant/acme".into(),
                    tenant: "acme".into(),
                    time_ms: 1000 + i,
                    version: SCHEMA_VERSION,
                };
                let data = e.canonical();
                prev = merkle::hex(&merkle::leaf_hash(&data));
                StoredEntry { seq: 10 + i, data }
            })
            .collect()
    }

    fn checkpoint(s: &Signer, entries: &[StoredEntry], size: u64, seq: u64) -> StoredCheckpoint {
        let mut t = Tree::new();
        for e in &entries[..size as usize] {
            t.push(e.data.clone());
        }
        let note = s.sign(&Checkpoint {
            origin: ORIGIN.into(),
            size,
            root: t.root(),
            time_ms: 1,
        });
        StoredCheckpoint { seq, note }
    }

    #[test]
    fn an_untouched_log_verifies_and_every_tamper_names_its_entry() {
        let s = Signer::from_seed("agentbus/A/audit", &[9u8; 32]).unwrap();
        let v: Verifier = s.verifier_key().parse().unwrap();
        let entries = log_of(10);
        let cps = vec![
            checkpoint(&s, &entries, 3, 100),
            checkpoint(&s, &entries, 7, 101),
            checkpoint(&s, &entries, 10, 102),
        ];
        let r = verify_log("acme", ORIGIN, &v, &entries, &cps).unwrap();
        assert_eq!((r.entries, r.checkpoints, r.signed_size), (10, 3, 10));
        assert_eq!((r.inclusion_proofs, r.consistency_proofs), (10, 2));

        // Deleted entry 4.
        let mut d = entries.clone();
        d.remove(4);
        assert_eq!(
            verify_log("acme", ORIGIN, &v, &d, &cps).unwrap_err().index,
            Some(4)
        );
        // A different entry 5 published at the end.
        let mut w = entries.clone();
        let mut forged = AuditEvent::decode(&entries[5].data).unwrap();
        forged.reason = "nothing happened".into();
        w.push(StoredEntry {
            seq: 99,
            data: forged.canonical(),
        });
        let e = verify_log("acme", ORIGIN, &v, &w, &cps).unwrap_err();
        assert_eq!(e.index, Some(5), "{e}");
        // Entry 5 edited in place (a flipped byte that stays canonical).
        let mut x = entries.clone();
        x[5].data = forged.canonical();
        assert_eq!(
            verify_log("acme", ORIGIN, &v, &x, &cps).unwrap_err().index,
            Some(5)
        );
        // The last entry edited: only the checkpoint catches it.
        let mut l = entries.clone();
        let mut last = AuditEvent::decode(&entries[9].data).unwrap();
        last.outcome = Outcome::Denied;
        l[9].data = last.canonical();
        assert_eq!(
            verify_log("acme", ORIGIN, &v, &l, &cps).unwrap_err().index,
            Some(9)
        );
        // A byte flipped into a non-canonical or broken form.
        let mut b = entries.clone();
        b[2].data[0] = b' ';
        assert_eq!(
            verify_log("acme", ORIGIN, &v, &b, &cps).unwrap_err().index,
            Some(2)
        );
        // A suffix purged after the checkpoint of size 10.
        let e = verify_log("acme", ORIGIN, &v, &entries[..6], &cps).unwrap_err();
        assert_eq!(e.index, Some(6), "{e}");
        // A forged checkpoint (another key) is refused.
        let other = Signer::from_seed("agentbus/A/audit", &[8u8; 32]).unwrap();
        let mut f = cps.clone();
        f.push(checkpoint(&other, &entries, 10, 103));
        let e = verify_log("acme", ORIGIN, &v, &entries, &f).unwrap_err();
        assert!(e.message.contains("no signature"), "{e}");
        // A checkpoint inconsistent with the earlier ones (a different history).
        let mut alt = entries.clone();
        alt[1].data = {
            let mut e1 = AuditEvent::decode(&entries[1].data).unwrap();
            e1.actor.id = "mallory".into();
            e1.canonical()
        };
        let mut g = cps.clone();
        g.insert(1, checkpoint(&s, &alt, 5, 100));
        assert!(verify_log("acme", ORIGIN, &v, &entries, &g).is_err());
    }

    fn anchor_of(s: &Signer, entries: &[StoredEntry], size: u64, seq: u64) -> StoredEntry {
        let mut r = CompactRange::new();
        for e in &entries[..size as usize] {
            r.push_leaf_hash(merkle::leaf_hash(&e.data));
        }
        let a = Anchor {
            checkpoint: checkpoint(s, entries, size, 0).note,
            frontier: r.frontier().iter().map(|h| merkle::hex(h)).collect(),
            cutoff_ms: 5,
            pruned_at_ms: 6,
        };
        StoredEntry {
            seq,
            data: serde_json::to_vec(&a).unwrap(),
        }
    }

    #[test]
    fn a_pruned_log_verifies_from_its_anchor_and_tampering_is_still_named() {
        let s = Signer::from_seed("agentbus/A/audit", &[9u8; 32]).unwrap();
        let v: Verifier = s.verifier_key().parse().unwrap();
        let entries = log_of(20);
        let cps = vec![
            checkpoint(&s, &entries, 5, 100),
            checkpoint(&s, &entries, 12, 101),
            checkpoint(&s, &entries, 20, 102),
        ];
        let anchor = anchor_of(&s, &entries, 12, 200);
        let kept = &entries[12..];
        let r = verify_retained("acme", ORIGIN, &v, Some(&anchor), kept, &cps[1..]).unwrap();
        assert_eq!((r.first_index, r.entries, r.signed_size), (12, 8, 20));
        assert_eq!((r.inclusion_proofs, r.consistency_proofs), (8, 1));
        assert_eq!(r.pruned_at_ms, Some(6));
        let full = verify_log("acme", ORIGIN, &v, &entries, &cps).unwrap();
        assert_eq!(r.root, full.root);
        // An interrupted prune: old entries and checkpoints still there.
        let r = verify_retained("acme", ORIGIN, &v, Some(&anchor), &entries[3..], &cps).unwrap();
        assert_eq!((r.first_index, r.entries), (12, 8));
        // Without its anchor the pruned log is missing its prefix.
        assert!(verify_log("acme", ORIGIN, &v, kept, &cps[1..]).is_err());
        // An entry of the retained range edited: named.
        let mut x = kept.to_vec();
        let mut e = AuditEvent::decode(&x[3].data).unwrap();
        e.reason = "edited".into();
        x[3].data = e.canonical();
        let f = verify_retained("acme", ORIGIN, &v, Some(&anchor), &x, &cps[1..]).unwrap_err();
        assert_eq!(f.index, Some(15), "{f}");
        // The first retained entry edited: the next checkpoint's root names it.
        let mut y = kept.to_vec();
        let mut e = AuditEvent::decode(&y[0].data).unwrap();
        e.reason = "edited".into();
        y[0].data = e.canonical();
        let f = verify_retained("acme", ORIGIN, &v, Some(&anchor), &y, &cps[1..]).unwrap_err();
        assert_eq!(f.index, Some(12), "{f}");
        // A retained entry deleted.
        let mut d = kept.to_vec();
        d.remove(2);
        let f = verify_retained("acme", ORIGIN, &v, Some(&anchor), &d, &cps[1..]).unwrap_err();
        assert_eq!(f.index, Some(14), "{f}");
        // A forged frontier, or an anchor signed by another key.
        let mut bad: Anchor = serde_json::from_slice(&anchor.data).unwrap();
        bad.frontier.reverse();
        let bad = StoredEntry {
            seq: 201,
            data: serde_json::to_vec(&bad).unwrap(),
        };
        let f = verify_retained("acme", ORIGIN, &v, Some(&bad), kept, &cps[1..]).unwrap_err();
        assert!(f.message.contains("frontier"), "{f}");
        let other = Signer::from_seed("agentbus/A/audit", &[8u8; 32]).unwrap();
        let forged = anchor_of(&other, &entries, 12, 202);
        let f = verify_retained("acme", ORIGIN, &v, Some(&forged), kept, &cps[1..]).unwrap_err();
        assert!(f.message.contains("no signature"), "{f}");
    }

    #[test]
    fn bundles_verify_offline_and_refuse_changes() {
        let s = Signer::from_seed("agentbus/A/audit", &[9u8; 32]).unwrap();
        let entries = log_of(6);
        let mut t = Tree::new();
        for e in &entries {
            t.push(e.data.clone());
        }
        let cp = checkpoint(&s, &entries, 6, 1);
        let event = String::from_utf8(entries[3].data.clone()).unwrap();
        let bundle = InclusionBundle {
            log: "acme".into(),
            event_id: format!("{:032x}", 3),
            index: 3,
            leaf_hash: merkle::hex(&merkle::leaf_hash(event.as_bytes())),
            event,
            tree_size: 6,
            path: t
                .inclusion_proof(3)
                .unwrap()
                .iter()
                .map(|h| merkle::hex(h))
                .collect(),
            checkpoint: cp.note,
            verifier_key: s.verifier_key(),
        };
        let text = serde_json::to_string(&bundle).unwrap();
        let back: InclusionBundle = serde_json::from_str(&text).unwrap();
        assert_eq!(verify_bundle(&back, None).unwrap().size, 6);
        let mut bad = back.clone();
        bad.event = bad.event.replace("r3", "r4");
        assert!(verify_bundle(&bad, None).is_err());
        let other: Verifier = Signer::from_seed("agentbus/A/audit", &[1u8; 32])
            .unwrap()
            .verifier_key()
            .parse()
            .unwrap();
        assert!(verify_bundle(&back, Some(&other)).is_err());
    }
}
