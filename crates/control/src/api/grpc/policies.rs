//! `malla.policy.v1.Policies`: sidecars follow the resilience policy of each service they
//! call (`WatchPolicy`, a [`super::resource_watch`]), and report the resilience events
//! they observe (`ReportEvents`).

#[cfg(test)]
mod tests;

use malla_api::policy_pb as pb;
use malla_core::ServiceName;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{api::Backend, events, metrics::WatchKind, policies::StoredPolicy, store::Store};

pub struct PoliciesGrpc<S> {
    backend: Backend<S>,
    stop: watch::Receiver<bool>,
}

impl<S: Store + Clone> PoliciesGrpc<S> {
    pub fn new(backend: Backend<S>, stop: watch::Receiver<bool>) -> Self {
        PoliciesGrpc { backend, stop }
    }
}

type PolicyStream = super::Streaming<pb::PolicyUpdate>;

#[tonic::async_trait]
impl<S: Store + Clone> malla_api::PoliciesService for PoliciesGrpc<S> {
    type WatchPolicyStream = PolicyStream;

    async fn watch_policy(
        &self,
        request: Request<pb::WatchPolicyRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let held = super::connection(&request).map(|c| c.watch_opened());
        let service = ServiceName::new(&request.into_inner().service)
            .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let policies = self.backend.policies.clone();
        let open = self.backend.metrics.watch_opened(WatchKind::Policy);
        super::streaming(&self.stop, |tx, stop| async move {
            super::resource_watch::run(policies, service, tx, stop, update).await;
            drop((open, held));
        })
    }

    async fn report_events(
        &self,
        request: Request<pb::ReportEventsRequest>,
    ) -> Result<Response<pb::ReportEventsResponse>, Status> {
        let backend = &self.backend;
        let caller = super::caller(
            &request,
            &backend.operator,
            backend.identity.ca.trust_domain(),
            &backend.metrics,
        )?;
        let mut events =
            events::from_request(request.into_inner()).map_err(Status::invalid_argument)?;
        // A workload reports as its own service, whatever the request said.
        let reported = events.first().and_then(|e| e.reporter.service.clone());
        let reporter = caller
            .reporter(reported.as_deref())
            .map_err(|refused| super::refuse(&backend.metrics, &refused))?;
        for event in &mut events {
            event.reporter.service.clone_from(&reporter);
        }
        let accepted = u32::try_from(events.len()).unwrap_or(u32::MAX);
        self.backend.events.push(events);
        Ok(Response::new(pb::ReportEventsResponse { accepted }))
    }
}

/// The message for a service's policy (`None`: it has none).
fn update(policy: Option<&StoredPolicy>) -> pb::PolicyUpdate {
    match policy {
        Some(p) => pb::PolicyUpdate {
            version: p.version,
            policy_json: p.json.to_string(),
        },
        None => pb::PolicyUpdate {
            version: 0,
            policy_json: String::new(),
        },
    }
}
