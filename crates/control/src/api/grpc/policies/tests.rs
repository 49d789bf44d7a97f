//! `malla.policy.v1.Policies` over a real socket, with a real tonic client, against a real
//! control plane.

use std::time::Duration;

use malla_api::{policy_pb as pb, PoliciesClient, PolicyState};
use malla_core::{Policy, ServiceName};
use tokio::time::timeout;
use tonic::{transport::Channel, Code, Streaming};

use crate::{
    api::grpc::tests::{control, operator, TempDir},
    events::EventFilter,
    server::Control,
};

async fn client(control: &Control) -> PoliciesClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", control.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PoliciesClient::new(channel)
}

async fn watch(client: &mut PoliciesClient<Channel>, service: &str) -> Streaming<pb::PolicyUpdate> {
    client
        .watch_policy(pb::WatchPolicyRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<pb::PolicyUpdate>, service: &str) -> PolicyState {
    let message = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no policy message within 10 s")
        .expect("the watch failed")
        .expect("the watch ended");
    PolicyState::from_update(&message, service).unwrap()
}

/// Nothing arrives within a short while.
async fn quiet(stream: &mut Streaming<pb::PolicyUpdate>) {
    if let Ok(message) = timeout(Duration::from_millis(200), stream.message()).await {
        panic!("unexpected message: {message:?}");
    }
}

fn policy(max_attempts: u32) -> Policy {
    let mut p = Policy::default();
    p.retries.max_attempts = max_attempts;
    p
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_policy_sends_the_state_then_every_change() {
    let dir = TempDir::new("policy-watch");
    let control = control(&dir).await;
    let mut client = client(&control).await;

    // A policy that exists before the watch: the first message.
    let first = control
        .policies
        .put(&name("quote"), policy(2))
        .await
        .unwrap();
    assert!(first.created);
    let mut stream = watch(&mut client, "quote").await;
    let state = next(&mut stream, "quote").await;
    assert_eq!(state.version, first.version);
    let p = state.policy.unwrap();
    assert_eq!(p.retries.max_attempts, 2);
    assert_eq!(
        p.service.as_deref(),
        Some("quote"),
        "the service is filled in"
    );

    // Another service's policy is not sent; an update of this one is, with a new version.
    control
        .policies
        .put(&name("billing"), policy(4))
        .await
        .unwrap();
    let second = control
        .policies
        .put(&name("quote"), policy(3))
        .await
        .unwrap();
    assert!(!second.created && !second.unchanged);
    assert!(second.version > first.version);
    let state = next(&mut stream, "quote").await;
    assert_eq!(state.version, second.version);
    assert_eq!(state.policy.unwrap().retries.max_attempts, 3);

    // The same policy again writes nothing and sends nothing.
    let same = control
        .policies
        .put(&name("quote"), policy(3))
        .await
        .unwrap();
    assert!(same.unchanged);
    assert_eq!(same.version, second.version);
    quiet(&mut stream).await;

    // A delete: "no policy".
    control.policies.delete(&name("quote")).await.unwrap();
    let state = next(&mut stream, "quote").await;
    assert_eq!(
        state,
        PolicyState {
            version: 0,
            policy: None,
            unknown_fields: vec![]
        }
    );

    // A service without a policy: "no policy" first, then its first policy.
    let mut stream = watch(&mut client, "orders").await;
    assert_eq!(next(&mut stream, "orders").await.policy, None);
    let created = control
        .policies
        .put(&name("orders"), policy(1))
        .await
        .unwrap();
    assert_eq!(next(&mut stream, "orders").await.version, created.version);

    // A bad service name is refused.
    let err = client
        .watch_policy(pb::WatchPolicyRequest {
            service: "Orders".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("service: "), "{}", err.message());

    // Stopping the control plane ends the stream with UNAVAILABLE.
    control.stop().await;
    let end = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_and_the_previous_version_stays() {
    let dir = TempDir::new("policy-invalid");
    let control = control(&dir).await;
    let kept = control
        .policies
        .put(&name("quote"), policy(2))
        .await
        .unwrap();
    let err = control
        .policies
        .put(&name("quote"), policy(0))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("retries.max_attempts: 0 is not between 1 and 10"),
        "{err}"
    );
    let mut other = policy(2);
    other.service = Some("billing".into());
    let err = control
        .policies
        .put(&name("quote"), other)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("service: \"billing\""), "{err}");
    let stored = control.policies.get(&name("quote")).unwrap();
    assert_eq!(stored.version, kept.version);
    assert_eq!(stored.policy.retries.max_attempts, 2);

    // Policies outlive a restart, with their versions; the registry ignores their keys.
    control.stop().await;
    let control = crate::api::grpc::tests::control(&dir).await;
    let stored = control.policies.get(&name("quote")).unwrap();
    assert_eq!(stored.version, kept.version);
    assert!(control.registry.view().services.is_empty());
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_events_are_kept_and_bad_ones_refused() {
    let dir = TempDir::new("policy-events");
    let control = control(&dir).await;
    let mut anonymous = client(&control).await;
    // The operator may report as any service; a caller with no credential not at all.
    let channel = Channel::from_shared(format!("http://{}", control.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PoliciesClient::with_interceptor(channel, operator(&control));
    let event = pb::ResilienceEvent {
        at_ms: 1_700_000_000_000,
        upstream: "quote".into(),
        endpoint: "127.0.0.1:9".into(),
        kind: "ejected".into(),
        audit: false,
        count: 1,
        detail: "5 consecutive failures (last: connect-failure)".into(),
        service: "shipping-quote".into(),
    };
    let answer = client
        .report_events(pb::ReportEventsRequest {
            service: "frontend".into(),
            instance_id: "frontend-1".into(),
            events: vec![event.clone(), event.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 2);
    let kept = control.events.query(&EventFilter::default(), 10);
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].service.as_deref(), Some("shipping-quote"));
    assert_eq!(kept[0].reporter.service.as_deref(), Some("frontend"));

    let err = client
        .report_events(pb::ReportEventsRequest {
            service: String::new(),
            instance_id: String::new(),
            events: vec![pb::ResilienceEvent {
                endpoint: "nowhere".into(),
                ..event.clone()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].endpoint"),
        "{}",
        err.message()
    );
    assert_eq!(control.events.len(), 2, "a refused call keeps nothing");
    let err = anonymous
        .report_events(pb::ReportEventsRequest {
            service: "frontend".into(),
            instance_id: "frontend-1".into(),
            events: vec![event],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("join token"), "{err:?}");
    assert_eq!(control.events.len(), 2, "a refused call keeps nothing");
    control.stop().await;
}
