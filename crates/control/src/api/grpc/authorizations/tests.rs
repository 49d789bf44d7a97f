//! `malla.authz.v1.Authorizations` over a real socket, with a real tonic client, against a
//! real control plane. (The stream's coalescing and lag handling are the policy watch's,
//! tested there.)

use std::time::Duration;

use malla_api::{authz_pb as pb, AuthorizationState, AuthorizationsClient};
use malla_core::{
    authz::{Action, AuthorizationPolicy, PeerMtls, Rule},
    ServiceName,
};
use tokio::time::timeout;
use tonic::{transport::Channel, Code, Streaming};

use crate::{
    api::grpc::tests::{control, TempDir},
    server::Control,
};

async fn client(control: &Control) -> AuthorizationsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", control.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuthorizationsClient::new(channel)
}

async fn watch(
    client: &mut AuthorizationsClient<Channel>,
    service: &str,
) -> Streaming<pb::AuthorizationUpdate> {
    client
        .watch_authorization(pb::WatchAuthorizationRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<pb::AuthorizationUpdate>) -> pb::AuthorizationUpdate {
    timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no authorization message within 10 s")
        .expect("the watch failed")
        .expect("the watch ended")
}

/// Nothing arrives within a short while.
async fn quiet(stream: &mut Streaming<pb::AuthorizationUpdate>) {
    if let Ok(message) = timeout(Duration::from_millis(200), stream.message()).await {
        panic!("unexpected message: {message:?}");
    }
}

/// A policy of `service` that allows only `from` (by default, everything else denied).
fn only(service: &str, from: &str) -> AuthorizationPolicy {
    AuthorizationPolicy {
        service: service.into(),
        default: Action::Deny,
        mode: Default::default(),
        mtls: None,
        rules: vec![Rule {
            action: Action::Allow,
            from: Some(vec![from.into()]),
            ports: None,
            methods: None,
            paths: None,
            grpc: None,
        }],
    }
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_authorization_sends_the_state_then_every_change_and_resumes_by_version() {
    let dir = TempDir::new("authz-watch");
    let control = control(&dir).await;
    let mut client = client(&control).await;
    let authorizations = control.authorizations.clone();

    // A policy that exists before the watch: the first message, with the trust domain.
    let first = authorizations
        .put(&name("payments"), only("payments", "checkout"))
        .await
        .unwrap();
    let mut stream = watch(&mut client, "payments").await;
    let message = next(&mut stream).await;
    assert_eq!(message.version, first.version);
    assert_eq!(message.trust_domain, "malla.local");
    assert_eq!(message.mesh_mtls, "permissive", "the mesh's default mode");
    let state = AuthorizationState::from_update(&message, "payments").unwrap();
    let policy = state.policy.unwrap();
    assert_eq!(policy.policy().rules[0].from, Some(vec!["checkout".into()]));

    // Another service's change is not sent; one of this service is, with a new version.
    authorizations
        .put(&name("billing"), only("billing", "checkout"))
        .await
        .unwrap();
    let second = authorizations
        .put(&name("payments"), only("payments", "orders"))
        .await
        .unwrap();
    assert!(second.version > first.version);
    let message = next(&mut stream).await;
    assert_eq!(message.version, second.version);
    assert!(message.policy_json.contains("orders"), "{message:?}");

    // The same policy again writes nothing and sends nothing.
    let same = authorizations
        .put(&name("payments"), only("payments", "orders"))
        .await
        .unwrap();
    assert!(same.unchanged);
    quiet(&mut stream).await;

    // A delete: "no policy", every caller allowed.
    authorizations.delete(&name("payments")).await.unwrap();
    let message = next(&mut stream).await;
    assert_eq!((message.version, message.policy_json.as_str()), (0, ""));
    assert_eq!(message.trust_domain, "malla.local");
    assert!(AuthorizationState::from_update(&message, "payments")
        .unwrap()
        .policy
        .is_none());

    // A bad service name is refused.
    let err = client
        .watch_authorization(pb::WatchAuthorizationRequest {
            service: "Payments".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("service: "), "{}", err.message());

    // Stopping the control plane ends the stream with UNAVAILABLE; after the restart, a
    // new stream starts with the same version as before: the sidecar has it already.
    let kept = authorizations
        .put(&name("payments"), only("payments", "checkout"))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.version, kept.version);
    drop(authorizations);
    control.stop().await;
    let end = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    let control = crate::api::grpc::tests::control(&dir).await;
    let mut client = self::client(&control).await;
    let mut stream = watch(&mut client, "payments").await;
    assert_eq!(next(&mut stream).await.version, kept.version);
    control.stop().await;
}

/// The mesh's mTLS mode (`--mtls-mode`) is in every message, beside the policy, whose own
/// `mtls` wins at the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_carries_the_meshs_mtls_mode() {
    let dir = TempDir::new("authz-mesh-mtls");
    let any = "127.0.0.1:0".parse().unwrap();
    let control = Control::start_with(
        crate::server::ControlConfig {
            data_dir: dir.0.clone(),
            http_addr: any,
            grpc_addr: any,
            dns_addr: None,
            dns: Default::default(),
            identity: crate::server::IdentitySettings {
                mtls_mode: PeerMtls::Strict,
                ..Default::default()
            },
            tls_names: Vec::new(),
        },
        crate::serving::ServeSettings {
            allow_plaintext: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut client = client(&control).await;
    let mut stream = watch(&mut client, "ledger").await;
    let message = next(&mut stream).await;
    assert_eq!((message.version, message.mesh_mtls.as_str()), (0, "strict"));
    let state = AuthorizationState::from_update(&message, "ledger").unwrap();
    assert_eq!(state.mtls(), (PeerMtls::Strict, false));

    let mut policy = only("ledger", "checkout");
    policy.mtls = Some(PeerMtls::Permissive);
    control
        .authorizations
        .put(&name("ledger"), policy)
        .await
        .unwrap();
    let message = next(&mut stream).await;
    assert_eq!(message.mesh_mtls, "strict");
    let state = AuthorizationState::from_update(&message, "ledger").unwrap();
    assert_eq!(
        state.mtls(),
        (PeerMtls::Permissive, true),
        "the service's own"
    );

    control
        .authorizations
        .delete(&name("ledger"))
        .await
        .unwrap();
    let message = next(&mut stream).await;
    assert_eq!((message.version, message.mesh_mtls.as_str()), (0, "strict"));
    control.stop().await;
}
