//! Which JetStream stores a state directory already holds, and whether
//! `agentbus up` with a given node count would use them.
//!
//! `agentbus up` keeps a single server's store in `STATE/jetstream` and a
//! local cluster's in `STATE/cluster/n<i>/jetstream`. Changing the
//! shape of a deployment that holds data must never make that data vanish
//! from view, nor strand it:
//!
//! - A single server's store cannot become a cluster member's: NATS treats
//!   streams it finds on disk without a cluster assignment as orphans and
//!   deletes them (nats-server issue 5467); copying is a backup and restore.
//!   So `up --cluster N` on a directory whose single server holds data, and
//!   `up` on one whose cluster does, are refused, naming the reason: the
//!   other shape would start with an empty store beside the data (tenants,
//!   keys, queued tasks), which the controller then could only report as an
//!   uninitialised installation.
//! - A cluster started with fewer nodes than hold data leaves the streams
//!   placed on the missing nodes without a quorum (an R3 stream on two absent
//!   nodes cannot be read or written), so that is refused too; more nodes are
//!   fine (they join the cluster, and the placement pass raises replicas).
//!
//! The way from a single server's data to a cluster is a copy
//! (`up --cluster N --from-single`, [`crate::import`]), allowed only into an
//! empty cluster ([`Stores::refuse_copy`]).

use std::path::Path;

/// What a state directory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stores {
    /// `STATE/jetstream` (the single server's store) holds data.
    pub single: bool,
    /// The local cluster's nodes (`n1`, `n2`, ...) whose store holds data.
    pub cluster_nodes: Vec<usize>,
}

/// Whether `dir` exists and holds at least one entry.
fn holds_data(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

impl Stores {
    /// Reads what `state` holds (a missing directory holds nothing).
    pub fn of(state: &Path) -> Self {
        let single = holds_data(&state.join("jetstream"));
        let mut cluster_nodes: Vec<usize> = std::fs::read_dir(state.join("cluster"))
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let n: usize = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix('n')?
                    .parse()
                    .ok()?;
                holds_data(&entry.path().join("jetstream")).then_some(n)
            })
            .collect();
        cluster_nodes.sort_unstable();
        Self {
            single,
            cluster_nodes,
        }
    }

    /// Why starting `nodes` servers on this directory would hide or strand
    /// its data; `None` when it would not. `state` names the directory in
    /// the message.
    pub fn refuse(&self, state: &Path, nodes: usize) -> Option<String> {
        let dir = state.display();
        let most = self.cluster_nodes.iter().copied().max().unwrap_or(0);
        if nodes <= 1 {
            if most > 0 && !self.single {
                return Some(format!(
                    "{dir} holds a {most}-node cluster's data ({}); a single server would start empty beside it: run `agentbus up --cluster {most}`, or use another --state",
                    state.join("cluster").display()
                ));
            }
            return None;
        }
        if self.single && most == 0 {
            return Some(format!(
                "{dir} holds a single server's data ({}); a cluster would start empty beside it, and NATS cannot turn a single server's store into a cluster member's (it deletes such streams as orphans): keep running `agentbus up` without --cluster, or use another --state for the cluster",
                state.join("jetstream").display()
            ));
        }
        if most > nodes {
            return Some(format!(
                "{dir} holds a {most}-node cluster's data; with --cluster {nodes} the streams placed on the missing nodes lose their quorum: run `agentbus up --cluster {most}` (or more)"
            ));
        }
        None
    }

    /// Why copying the single server's data into a new cluster of `nodes`
    /// (`up --cluster N --from-single`) cannot start; `None` when it can:
    /// the single server holds data and the cluster none (a copy is never
    /// merged into data).
    pub fn refuse_copy(&self, state: &Path, nodes: usize) -> Option<String> {
        let dir = state.display();
        if nodes < 2 {
            return Some("--from-single copies into a cluster: add --cluster N".to_string());
        }
        if !self.single {
            return Some(format!(
                "{dir} holds no single server's data to copy ({} is empty)",
                state.join("jetstream").display()
            ));
        }
        if !self.cluster_nodes.is_empty() {
            return Some(format!(
                "{} already holds a cluster's data (an earlier copy?); a copy is never merged into data: move it aside and run again",
                state.join("cluster").display()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed set-up step should abort the test with its message.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn with_data(dir: &Path) {
        std::fs::create_dir_all(dir.join("jetstream").join("$SYS")).unwrap();
    }

    #[test]
    fn an_empty_or_missing_directory_takes_any_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nothing-here");
        for state in [tmp.path(), missing.as_path()] {
            let stores = Stores::of(state);
            assert_eq!(stores, Stores::default());
            for nodes in [1, 3, 5] {
                assert_eq!(stores.refuse(state, nodes), None);
            }
        }
        // Directories without stores (a server that never started) hold nothing.
        std::fs::create_dir_all(tmp.path().join("jetstream")).unwrap();
        std::fs::create_dir_all(tmp.path().join("cluster").join("n1")).unwrap();
        assert_eq!(Stores::of(tmp.path()), Stores::default());
    }

    #[test]
    fn a_single_servers_data_refuses_a_cluster_and_keeps_the_single_server() {
        let tmp = tempfile::tempdir().unwrap();
        with_data(tmp.path());
        let stores = Stores::of(tmp.path());
        assert!(stores.single);
        assert_eq!(stores.refuse(tmp.path(), 1), None);
        let why = stores.refuse(tmp.path(), 3).unwrap();
        assert!(why.contains("single server's data"), "{why}");
        assert!(why.contains("orphans"), "{why}");
    }

    #[test]
    fn a_clusters_data_refuses_a_single_server_and_fewer_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        for n in ["n1", "n2", "n3"] {
            with_data(&tmp.path().join("cluster").join(n));
        }
        std::fs::create_dir_all(tmp.path().join("cluster").join("notes")).unwrap();
        let stores = Stores::of(tmp.path());
        assert_eq!(stores.cluster_nodes, vec![1, 2, 3]);
        let why = stores.refuse(tmp.path(), 1).unwrap();
        assert!(
            why.contains("3-node cluster") && why.contains("--cluster 3"),
            "{why}"
        );
        let why = stores.refuse(tmp.path(), 2).unwrap();
        assert!(why.contains("lose their quorum"), "{why}");
        assert_eq!(stores.refuse(tmp.path(), 3), None);
        assert_eq!(stores.refuse(tmp.path(), 5), None, "more nodes join");
    }

    #[test]
    fn a_copy_needs_a_single_servers_data_and_an_empty_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let why = Stores::of(tmp.path()).refuse_copy(tmp.path(), 3).unwrap();
        assert!(why.contains("no single server's data"), "{why}");
        with_data(tmp.path());
        let stores = Stores::of(tmp.path());
        assert_eq!(stores.refuse_copy(tmp.path(), 3), None);
        assert!(stores.refuse_copy(tmp.path(), 1).is_some());
        with_data(&tmp.path().join("cluster").join("n1"));
        let why = Stores::of(tmp.path()).refuse_copy(tmp.path(), 3).unwrap();
        assert!(why.contains("never merged"), "{why}");
    }

    #[test]
    fn both_shapes_holding_data_leave_the_choice_to_the_operator() {
        // Someone moved stores around by hand: each shape uses its own, and
        // only a cluster too small for its nodes is refused.
        let tmp = tempfile::tempdir().unwrap();
        with_data(tmp.path());
        with_data(&tmp.path().join("cluster").join("n1"));
        with_data(&tmp.path().join("cluster").join("n2"));
        let stores = Stores::of(tmp.path());
        assert_eq!(stores.refuse(tmp.path(), 1), None);
        assert_eq!(stores.refuse(tmp.path(), 2), None);
        assert!(stores.refuse(tmp.path(), 3).is_none());
    }
}
