//! Who may do something, by the credentials the kernel reports for the caller (`SO_PEERCRED`,
//! which a process cannot forge): lists of users and groups, with one default.

/// Users and groups allowed. With both lists empty, root and the user shuntd runs as are;
/// otherwise exactly the listed users, and callers whose primary group is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl AccessList {
    /// Whether the default applies: no user or group listed.
    pub fn is_default(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// Whether a caller running as `uid` with primary group `gid` is allowed; `own_uid` is the
    /// user shuntd runs as.
    pub fn admits(&self, uid: u32, gid: u32, own_uid: u32) -> bool {
        if self.is_default() {
            uid == 0 || uid == own_uid
        } else {
            self.uids.contains(&uid) || self.gids.contains(&gid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_admits_root_and_shuntds_user_only() {
        let any = AccessList::default();
        assert!(any.admits(0, 0, 500));
        assert!(any.admits(500, 500, 500));
        assert!(
            !any.admits(1000, 0, 500),
            "another user, even in root's group"
        );
    }

    #[test]
    fn lists_admit_exactly_their_users_and_primary_groups() {
        let istio = AccessList {
            uids: vec![1337],
            gids: vec![2000],
        };
        assert!(istio.admits(1337, 1337, 0));
        assert!(istio.admits(4242, 2000, 0));
        assert!(!istio.admits(0, 0, 0), "root only when listed");
        assert!(!istio.admits(1000, 1000, 0));
    }
}
