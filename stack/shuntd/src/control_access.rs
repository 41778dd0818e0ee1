//! Who may use the control API. The control socket can change every namespace's rules and
//! certificates, so file permissions alone are a thin guard: a container that has the socket
//! mounted by mistake would own the node's policy. Each call is checked against the caller's
//! credentials, which the kernel reports (`SO_PEERCRED`), and cannot be forged.

use tokio::net::unix::UCred;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::config::ControlClientsSection;

/// The users and groups allowed to call the control API.
#[derive(Debug, Clone)]
pub struct ControlAccess {
    uids: Vec<u32>,
    gids: Vec<u32>,
    /// The user shuntd runs as, allowed (with root) when no list is configured.
    own_uid: u32,
}

impl ControlAccess {
    pub fn new(config: &ControlClientsSection, own_uid: u32) -> Self {
        Self {
            uids: config.uids.clone(),
            gids: config.gids.clone(),
            own_uid,
        }
    }

    /// Whether the default applies: no user or group listed.
    fn is_default(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// The control socket's file mode to match: owner only (root gets in anyway) under the
    /// default; open to every user when ids are listed, since the check on each call decides.
    pub fn socket_mode(&self) -> u32 {
        if self.is_default() { 0o600 } else { 0o666 }
    }

    /// Whether a caller with these credentials may call; the reason if not.
    pub fn check(&self, cred: Option<UCred>) -> Result<(), String> {
        let Some(cred) = cred else {
            return Err("the control socket reported no peer credentials".into());
        };
        let (uid, gid) = (cred.uid(), cred.gid());
        let allowed = if self.is_default() {
            uid == 0 || uid == self.own_uid
        } else {
            self.uids.contains(&uid) || self.gids.contains(&gid)
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "uid {uid} (gid {gid}) is not an allowed control client; see control_clients in shuntd's config"
            ))
        }
    }

    /// A tonic interceptor: refuses the call with `PERMISSION_DENIED` unless the caller is
    /// allowed, and tells `refused` about each refusal.
    pub fn interceptor(
        self,
        refused: impl Fn(&str) + Clone + Send + Sync + 'static,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        move |req: Request<()>| {
            let cred = req
                .extensions()
                .get::<UdsConnectInfo>()
                .and_then(|info| info.peer_cred);
            match self.check(cred) {
                Ok(()) => Ok(req),
                Err(reason) => {
                    refused(&reason);
                    Err(Status::permission_denied(reason))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials of a connected pair of Unix sockets in this process: our own.
    fn own_cred() -> UCred {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::net::UnixStream::from_std(a)
                .unwrap()
                .peer_cred()
                .unwrap()
        })
    }

    fn access(uids: &[u32], gids: &[u32], own_uid: u32) -> ControlAccess {
        ControlAccess::new(
            &ControlClientsSection {
                uids: uids.to_vec(),
                gids: gids.to_vec(),
            },
            own_uid,
        )
    }

    #[test]
    fn without_lists_only_root_and_shuntds_own_user_get_in() {
        let me = own_cred();
        assert!(access(&[], &[], me.uid()).check(Some(me)).is_ok());
        let stranger = me.uid().wrapping_add(1).max(1);
        let verdict = access(&[], &[], stranger).check(Some(me));
        if me.uid() == 0 {
            assert!(verdict.is_ok(), "root is always allowed without lists");
        } else {
            assert!(verdict.unwrap_err().contains(&format!("uid {}", me.uid())));
        }
    }

    #[test]
    fn with_lists_exactly_the_listed_users_and_groups_get_in() {
        let me = own_cred();
        let other = me.uid().wrapping_add(4242);
        assert!(access(&[me.uid()], &[], other).check(Some(me)).is_ok());
        assert!(access(&[other], &[me.gid()], other).check(Some(me)).is_ok());
        // A list replaces the default: not even shuntd's own user (or root) is implied.
        let refused = access(&[other], &[], me.uid()).check(Some(me)).unwrap_err();
        assert!(
            refused.contains("not an allowed control client"),
            "{refused}"
        );
    }

    #[test]
    fn a_caller_without_credentials_is_refused() {
        assert!(access(&[], &[], 0).check(None).is_err());
    }
}
