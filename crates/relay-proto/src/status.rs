//! `RelayError` <-> `tonic::Status`, losslessly between Relay peers.
//!
//! The full typed error travels as protobuf in the `relay-error-bin` metadata entry; the gRPC code is chosen so
//! that non-Relay clients still see something sensible. A status without that entry (a proxy, a crashed peer,
//! a transport failure) degrades to a safe code and a message with no internal detail.

use prost::Message;
use relay_core::pb::common::v1 as pb;
use relay_core::{ErrorCode, RelayError};
use tonic::{Code, Status};

const ERROR_KEY: &str = "relay-error-bin";

fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge => Code::InvalidArgument,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::ModelNotFound | ErrorCode::NotFound => Code::NotFound,
        ErrorCode::RateLimited | ErrorCode::InsufficientQuota | ErrorCode::UpstreamRateLimited => {
            Code::ResourceExhausted
        }
        ErrorCode::UpstreamClientError => Code::FailedPrecondition,
        ErrorCode::UpstreamServerError | ErrorCode::UpstreamUnreachable | ErrorCode::Unavailable => {
            Code::Unavailable
        }
        ErrorCode::UpstreamTimeout | ErrorCode::RequestTimeout => Code::DeadlineExceeded,
        ErrorCode::UpstreamProtocol | ErrorCode::Internal => Code::Internal,
        ErrorCode::Cancelled => Code::Cancelled,
    }
}

pub fn to_status(err: &RelayError) -> Status {
    let mut status = Status::new(grpc_code(err.code), err.message.clone());
    let bytes = err.to_pb().encode_to_vec();
    status.metadata_mut().insert_bin(ERROR_KEY, tonic::metadata::MetadataValue::from_bytes(&bytes));
    status
}

/// `service` names the peer in the degraded message ("auth service unavailable").
pub fn from_status(status: &Status, service: &str) -> RelayError {
    if let Some(v) = status.metadata().get_bin(ERROR_KEY)
        && let Ok(bytes) = v.to_bytes()
        && let Ok(e) = pb::Error::decode(bytes.as_ref())
    {
        return RelayError::from_pb(&e);
    }
    let code = match status.code() {
        Code::InvalidArgument => ErrorCode::InvalidRequest,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::NotFound => ErrorCode::NotFound,
        Code::ResourceExhausted => ErrorCode::RateLimited,
        Code::Cancelled => ErrorCode::Cancelled,
        Code::Unavailable | Code::DeadlineExceeded => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    RelayError::new(code, format!("{service} service unavailable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors_survive_the_trip() {
        for code in ErrorCode::ALL {
            let e = RelayError::new(code, "boom").with_upstream_status(503).with_retry_after(Some(7));
            let s = to_status(&e);
            assert_eq!(from_status(&s, "x"), e);
        }
    }

    #[test]
    fn foreign_statuses_degrade_without_detail() {
        let s = Status::unavailable("tcp connect error: 10.0.0.7:50051 refused");
        let e = from_status(&s, "routing");
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.message, "routing service unavailable");
        assert_eq!(from_status(&Status::unknown("x"), "a").code, ErrorCode::Internal);
    }
}
