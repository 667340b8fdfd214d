//! The service credential every internal gRPC call carries: a shared token in `x-relay-service-token`,
//! compared in constant time by every server. Without it, any pod that can reach a service port could
//! spend the provider keys through the adapter, or mint principals through auth.

use relay_core::Secret;
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::{Request, Status};

pub const TOKEN_HEADER: &str = "x-relay-service-token";

/// Client side: the trace context and the token, added to every call.
#[derive(Clone, Default)]
pub struct Outbound {
    token: Option<AsciiMetadataValue>,
}

impl Outbound {
    /// `None`: calls go without a token (only for servers that accept that).
    pub fn new(token: Option<&Secret>) -> Result<Self, relay_core::RelayError> {
        let token = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(MetadataValue::try_from(t.expose()).map_err(|_| {
                relay_core::RelayError::internal("the service token must be printable ASCII")
            })?),
            None => None,
        };
        Ok(Self { token })
    }
}

impl tonic::service::Interceptor for Outbound {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let mut req = crate::trace::inject(req)?;
        if let Some(t) = &self.token {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

/// Server side: refuses every call that does not carry the token (`None`: the operator opted out, every
/// call passes).
#[derive(Clone)]
pub struct RequireToken {
    token: Option<std::sync::Arc<[u8]>>,
}

impl RequireToken {
    pub fn new(token: Option<&Secret>) -> Self {
        Self { token: token.map(|t| t.expose().as_bytes().into()) }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else { return Ok(req) };
        let presented =
            req.metadata().get(TOKEN_HEADER).map(AsciiMetadataValue::as_bytes).unwrap_or_default();
        if bool::from(presented.ct_eq(token)) && !token.is_empty() {
            return Ok(req);
        }
        metrics::counter!("relay_grpc_unauthenticated_total").increment(1);
        tracing::warn!(path = ?req.metadata().get(":path"), "internal call without a valid service token refused");
        Err(Status::unauthenticated("this service accepts only calls from other Relay services"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    #[test]
    fn only_the_right_token_passes() {
        let secret = Secret::new("a-long-service-token");
        let mut server = RequireToken::new(Some(&secret));
        let mut good = Outbound::new(Some(&secret)).unwrap();
        assert!(server.call(good.call(Request::new(())).unwrap()).is_ok());
        let mut bad = Outbound::new(Some(&Secret::new("a-long-service-tokeX"))).unwrap();
        let e = server.call(bad.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut none = Outbound::new(None).unwrap();
        assert!(server.call(none.call(Request::new(())).unwrap()).is_err());
        let mut empty = RequireToken::new(Some(&Secret::new("")));
        assert!(empty.call(Request::new(())).is_err(), "an empty configured token never matches");
        assert!(RequireToken::new(None).call(Request::new(())).is_ok(), "opted out: everything passes");
    }
}
