//! Sessions carried over from an earlier shuntd, believed as far as they can be checked (see
//! [`crate::resume`]).

use std::os::fd::OwnedFd;

use shunt_sapi::message::ResumedSession;

use super::{
    LayerCounters, Registry, SessionError, SessionId, SessionLayer, SessionRecord, SessionState,
};
use crate::app::WorkerId;
use crate::limits::Resource;
use crate::resume::{self, Claimed, ResumeRefusal, SegmentIdentity};
use crate::tables::FiveTuple;
use crate::transport::TransportProto;

impl SessionLayer {
    /// Takes a worker's report of sessions in one segment it kept across a restart of shuntd,
    /// with the segment's memfd. Returns one outcome per session, in order: its id here, or
    /// why it was refused. A session whose other half has not been reported yet is listed as
    /// unconfirmed and holds no 5-tuple until it is.
    pub fn resume_sessions(
        &self,
        worker: WorkerId,
        segment: OwnedFd,
        sessions: &[ResumedSession],
    ) -> Vec<Result<SessionId, SessionError>> {
        let outcomes: Vec<Result<SessionId, SessionError>> =
            match resume::inspect(segment, sessions) {
                Ok((identity, checks)) => {
                    let mut reg = self.registry();
                    sessions
                        .iter()
                        .zip(checks)
                        .map(|(report, check)| {
                            check
                                .map_err(SessionError::from)
                                .and_then(|()| self.resume_one(&mut reg, worker, identity, report))
                        })
                        .collect()
                }
                Err(refusal) => sessions
                    .iter()
                    .map(|_| Err(refusal.clone().into()))
                    .collect(),
            };
        for outcome in &outcomes {
            match outcome {
                Err(SessionError::Resume(r)) => {
                    LayerCounters::bump(&self.counters.resume_refusals, r.as_str());
                }
                Err(e) => {
                    self.counters.count_refusal(e);
                    LayerCounters::bump(&self.counters.resume_refusals, e.code().as_str());
                }
                Ok(_) => {}
            }
        }
        outcomes
    }

    fn resume_one(
        &self,
        reg: &mut Registry,
        worker: WorkerId,
        segment: SegmentIdentity,
        report: &ResumedSession,
    ) -> Result<SessionId, SessionError> {
        let w = reg
            .workers
            .get(&worker)
            .ok_or(SessionError::UnknownWorker(worker))?;
        let (app, thread) = (w.app, w.thread);
        let namespace = reg.apps[&app].namespace.clone();
        let owner = reg.apps[&app].owner();
        if report.is_client {
            // A connecting half's address is its namespace's: nobody speaks for another's.
            let ns_address = self.with_namespaces(|n| n.get(&namespace).map(|n| n.address));
            if ns_address != Some(report.local.ip()) {
                return Err(ResumeRefusal::NotOwnAddress(report.local).into());
            }
        }
        reg.ledger.charge(&owner, Resource::Sessions, 1)?;
        let id = reg.session_id(thread);
        let claimed = match reg.resume_halves.claim(segment, worker, id, *report) {
            Ok(c) => c,
            Err(refusal) => {
                reg.ledger.release(&owner, Resource::Sessions, 1);
                return Err(refusal.into());
            }
        };
        let tuple = FiveTuple {
            proto: TransportProto::CutThrough,
            local: report.local,
            remote: report.remote,
        };
        let peer = match claimed {
            Claimed::Unconfirmed => None,
            Claimed::Confirmed(other) => Some(other),
        };
        reg.sessions.insert(
            id,
            SessionRecord {
                id,
                worker,
                app,
                namespace,
                transport: TransportProto::CutThrough,
                connection: None,
                tuple,
                is_client: report.is_client,
                state: SessionState::Unconfirmed,
                peer,
                charged_to: Some(owner),
            },
        );
        if let Some(other) = peer {
            confirm(reg, id, other);
            confirm(reg, other, id);
        }
        Ok(id)
    }
}

/// Marks a half whose other half has been reported as resumed: now it holds its 5-tuple,
/// unless a session made since the restart took it first.
fn confirm(reg: &mut Registry, id: SessionId, peer: SessionId) {
    let Some(s) = reg.sessions.get_mut(&id) else {
        return;
    };
    s.state = SessionState::Resumed;
    s.peer = Some(peer);
    let tuple = s.tuple;
    let _ = reg.table.insert_established(tuple, id);
}
