//! Access control on the Unix listeners: which peers may open a session.
//!
//! The check uses the credentials the kernel recorded when the peer called
//! `connect()` (`SO_PEERCRED`), read once at accept: a peer cannot change
//! them afterwards, and it cannot lie about them. With no allow list, anyone
//! who can open the socket (its mode, `--socket-mode`) is admitted. With
//! either list, a peer is admitted if its uid is in the uid list or its
//! primary gid (the one `SO_PEERCRED` reports; supplementary groups are not
//! consulted) is in the gid list. The daemon's own uid is not implied.
//!
//! A refused peer still gets an answer: the acceptor waits for its hello and
//! replies with `Reject::NotPermitted`, naming the uid, gid and pid it saw,
//! so the client library can report why instead of a bare hang-up. TCP
//! carries no credentials, so a server with an allow list refuses to serve
//! TCP at all.

use ipc_platform::PeerCredentials;

/// The uids and gids admitted; both empty admits everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AllowList {
    pub(crate) uids: Vec<u32>,
    pub(crate) gids: Vec<u32>,
}

impl AllowList {
    /// Whether no list was given, so that everyone is admitted.
    pub(crate) fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// Admits `peer`, or says why not (the reason is sent to the peer, so it
    /// names only what the peer already knows: its own credentials).
    pub(crate) fn check(&self, peer: &PeerCredentials) -> Result<(), String> {
        if self.is_open() || self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid) {
            return Ok(());
        }
        Err(format!(
            "uid {} gid {} (pid {}) is in neither the daemon's allowed uids nor its allowed gids",
            peer.uid, peer.gid, peer.pid
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> PeerCredentials {
        PeerCredentials { pid: 42, uid, gid }
    }

    #[test]
    fn no_list_admits_everyone() {
        let open = AllowList::default();
        assert!(open.is_open());
        assert_eq!(open.check(&peer(0, 0)), Ok(()));
        assert_eq!(open.check(&peer(65534, 65534)), Ok(()));
    }

    #[test]
    fn uid_or_primary_gid_admits() {
        let list = AllowList { uids: vec![1000, 1001], gids: vec![50] };
        assert!(!list.is_open());
        assert_eq!(list.check(&peer(1001, 7)), Ok(()), "by uid");
        assert_eq!(list.check(&peer(7, 50)), Ok(()), "by gid");
        let reason = list.check(&peer(7, 8)).unwrap_err();
        assert!(reason.contains("uid 7") && reason.contains("gid 8") && reason.contains("pid 42"), "{reason}");
    }

    #[test]
    fn one_list_alone_restricts() {
        let uids_only = AllowList { uids: vec![1000], gids: vec![] };
        assert!(uids_only.check(&peer(0, 1000)).is_err(), "a gid matching a uid is no match");
        let gids_only = AllowList { uids: vec![], gids: vec![1000] };
        assert!(gids_only.check(&peer(1000, 0)).is_err(), "a uid matching a gid is no match");
        assert_eq!(gids_only.check(&peer(0, 1000)), Ok(()));
    }
}
