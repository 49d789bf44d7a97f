//! A real `grpc.health.v1.Health` server ([tonic-health](https://docs.rs/tonic-health)),
//! for the control plane's gRPC health checks.
//!
//! It answers `SERVING` for the whole server (`""`) from the start; a test flips a service's
//! status with [`GrpcHealthPeer::set`]. An unknown service name gets `NOT_FOUND`, as the
//! protocol says.

use std::net::SocketAddr;

use hyper::server::conn::http2;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use tonic_health::{server::HealthReporter, ServingStatus};

use super::{serve, ServerTask};

/// A running gRPC health server; stops when dropped.
#[derive(Debug)]
pub struct GrpcHealthPeer {
    addr: SocketAddr,
    reporter: HealthReporter,
    _task: ServerTask,
}

impl GrpcHealthPeer {
    pub fn start() -> Self {
        let (reporter, service) = tonic_health::server::health_reporter();
        let (addr, task) = serve(move |stream| {
            let service = TowerToHyperService::new(service.clone());
            async move {
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        GrpcHealthPeer {
            addr,
            reporter,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the status answered for `service` (`""` = the whole server).
    pub async fn set(&self, service: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }
}
