//! TLS for both listeners and for the KME-to-KME client (OpenSSL).
//!
//! SAE API: the handshake asks for a client certificate but completes even without a valid one,
//! so that a missing, foreign or expired certificate gets a clear ETSI 401 JSON answer rather
//! than an opaque TLS alert; `identify` records the verification outcome per connection and no
//! request of such a connection is ever served. KME-to-KME: strict, the handshake itself fails
//! without a valid certificate, and the client checks the neighbour's CN is the expected KME.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use actix_tls::accept::openssl::TlsStream;
use actix_web::rt::net::TcpStream;
use kme_actors::types::CertIdentity;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{
    SslAcceptor, SslAcceptorBuilder, SslConnector, SslConnectorBuilder, SslContextBuilder,
    SslFiletype, SslMethod, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509PurposeId, X509Ref, X509VerifyResult};

use crate::cert_status::CertStatus;

#[derive(Debug, thiserror::Error)]
#[error("TLS setup with {file}: {source}")]
pub struct TlsError {
    file: String,
    source: openssl::error::ErrorStack,
}

fn at(file: &Path) -> impl Fn(openssl::error::ErrorStack) -> TlsError + '_ {
    move |source| TlsError {
        file: file.display().to_string(),
        source,
    }
}

/// Who is on the other end of a connection, as far as TLS could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A certificate chaining to our CA, valid now.
    Verified(CertIdentity),
    /// No client certificate.
    Missing,
    /// A certificate that failed verification.
    Rejected(String),
}

/// TLS 1.2+, our CA as the only trust anchor, and this KME's certificate and key.
fn load_identity(
    builder: &mut SslContextBuilder,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(), TlsError> {
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(at(cert))?;
    builder.set_ca_file(ca).map_err(at(ca))?;
    builder.set_certificate_chain_file(cert).map_err(at(cert))?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .map_err(at(key))?;
    builder.check_private_key().map_err(at(key))
}

fn base_acceptor(ca: &Path, cert: &Path, key: &Path) -> Result<SslAcceptorBuilder, TlsError> {
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(at(cert))?;
    load_identity(&mut builder, ca, cert, key)?;
    Ok(builder)
}

/// Acceptor of the SAE API (see the module doc for why verification failures pass the handshake).
pub fn sae_acceptor(ca: &Path, cert: &Path, key: &Path) -> Result<SslAcceptorBuilder, TlsError> {
    let mut builder = base_acceptor(ca, cert, key)?;
    builder.set_verify_callback(SslVerifyMode::PEER, |_preverified, _ctx| true);
    // Session resumption with client certificates needs a session id context.
    builder
        .set_session_id_context(b"kme-sae-api")
        .map_err(at(cert))?;
    Ok(builder)
}

/// Acceptor of the KME-to-KME channel: a valid certificate of our CA is required.
pub fn peer_acceptor(ca: &Path, cert: &Path, key: &Path) -> Result<SslAcceptorBuilder, TlsError> {
    let mut builder = base_acceptor(ca, cert, key)?;
    builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    // Only KME certificates (extended key usage serverAuth) may open the KME-to-KME channel,
    // whatever their CN says: an SAE certificate (clientAuth only) fails the handshake.
    builder
        .verify_param_mut()
        .set_purpose(X509PurposeId::SSL_SERVER)
        .map_err(at(cert))?;
    builder
        .set_session_id_context(b"kme-peer")
        .map_err(at(cert))?;
    Ok(builder)
}

/// Acceptor of an admin listener with TLS: a valid client certificate of our CA is required
/// (which CNs are operators is checked per request).
pub fn admin_acceptor(ca: &Path, cert: &Path, key: &Path) -> Result<SslAcceptorBuilder, TlsError> {
    let mut builder = base_acceptor(ca, cert, key)?;
    builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    builder
        .set_session_id_context(b"kme-admin")
        .map_err(at(cert))?;
    Ok(builder)
}

/// Client side of mutual TLS: [`load_identity`], the server's certificate verified.
fn base_connector(ca: &Path, cert: &Path, key: &Path) -> Result<SslConnectorBuilder, TlsError> {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(at(cert))?;
    // `SslConnector::builder` also trusts the system's CAs: start from an empty store, so
    // that our CA is the only trust anchor.
    builder.set_cert_store(X509StoreBuilder::new().map_err(at(ca))?.build());
    load_identity(&mut builder, ca, cert, key)?;
    builder.set_verify(SslVerifyMode::PEER);
    Ok(builder)
}

/// Client of the KME-to-KME channel towards `expected_peer`, whose certificate must not be
/// revoked (`status`).
pub fn peer_connector(
    ca: &Path,
    cert: &Path,
    key: &Path,
    expected_peer: &str,
    status: Arc<CertStatus>,
) -> Result<SslConnector, TlsError> {
    let mut builder = base_connector(ca, cert, key)?;
    let expected = expected_peer.to_string();
    builder.set_verify_callback(SslVerifyMode::PEER, move |preverified, ctx| {
        if !preverified {
            return false;
        }
        // Depth 0 is the neighbour's own certificate: it must name the KME we meant to reach.
        if ctx.error_depth() != 0 {
            return true;
        }
        let Some(identity) = ctx.current_cert().and_then(|c| cert_identity(c).ok()) else {
            return false;
        };
        match status.check(&identity) {
            Err(why) => {
                log::warn!("KME-to-KME: {expected}'s certificate refused: {why}");
                false
            }
            Ok(()) => identity.cn.as_deref() == Some(expected.as_str()),
        }
    });
    Ok(builder.build())
}

/// Client of the SAE API, for Rust SAEs and the load generator (`kme-bench load`): our CA
/// only, the SAE's certificate and key, HTTP/1.1 by ALPN (one request in flight per
/// connection, kept alive).
pub fn sae_connector(ca: &Path, cert: &Path, key: &Path) -> Result<SslConnector, TlsError> {
    let mut builder = base_connector(ca, cert, key)?;
    builder.set_alpn_protos(b"\x08http/1.1").map_err(at(cert))?;
    Ok(builder.build())
}

pub fn common_name(cert: &X509Ref) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|entry| entry.data().to_string().ok())
        .filter(|cn| !cn.is_empty() && cn != "*")
}

/// `on_connect` hook of both servers: turns Nagle's algorithm off and records the client's
/// [`identify`] in the connection's extensions.
///
/// actix-web writes a large response in more than one TLS record; with Nagle on, the last
/// small one waits for the ACK of the first, which the client delays by up to 40 ms: a BB84
/// frame's ~1,000 Cascade round trips between KMEs stalled like that about one time in three.
pub fn on_connect(connection: &dyn Any, extensions: &mut actix_web::dev::Extensions) {
    if let Some(tls) = connection.downcast_ref::<TlsStream<TcpStream>>() {
        // Best effort: a socket with Nagle on is slower, not wrong.
        let _ = tls.get_ref().set_nodelay(true);
    }
    extensions.insert(identify(connection));
}

/// The caller's identity as its connection's handshake established it, checked again now
/// (per request: it copies nothing): `Ok(None)` without a client certificate, `Err` with the
/// reason for one that was rejected, or has expired or been revoked since.
pub fn current_identity<'a>(
    connection: Option<&'a PeerIdentity>,
    status: &CertStatus,
) -> Result<Option<&'a CertIdentity>, String> {
    match connection {
        Some(PeerIdentity::Verified(identity)) => status.check(identity).map(|()| Some(identity)),
        Some(PeerIdentity::Rejected(why)) => Err(why.clone()),
        Some(PeerIdentity::Missing) | None => Ok(None),
    }
}

/// What TLS established about the client of this connection.
pub fn identify(connection: &dyn Any) -> PeerIdentity {
    let Some(tls) = connection.downcast_ref::<TlsStream<TcpStream>>() else {
        return PeerIdentity::Missing;
    };
    let ssl = tls.ssl();
    let Some(cert) = ssl.peer_certificate() else {
        return PeerIdentity::Missing;
    };
    let verified = ssl.verify_result();
    if verified != X509VerifyResult::OK {
        return PeerIdentity::Rejected(format!(
            "client certificate not accepted: {}",
            verified.error_string()
        ));
    }
    // Which of several CNs names the caller would be anyone's guess (and some tools take the
    // last where we would take the first): such a certificate is no identity.
    if cert.subject_name().entries_by_nid(Nid::COMMONNAME).count() > 1 {
        return PeerIdentity::Rejected(
            "the client certificate has several CNs: whose it is is ambiguous".into(),
        );
    }
    match cert_identity(&cert) {
        Ok(identity) => PeerIdentity::Verified(identity),
        Err(_) => PeerIdentity::Rejected("client certificate cannot be read".into()),
    }
}

/// What a certificate (verified by the caller) says about its holder.
pub fn cert_identity(cert: &X509Ref) -> Result<CertIdentity, openssl::error::ErrorStack> {
    let hex = kme_actors::types::hex;
    let epoch = openssl::asn1::Asn1Time::from_unix(0)?;
    let until = epoch.diff(cert.not_after())?;
    Ok(CertIdentity {
        cn: common_name(cert),
        sha256: hex(&cert.digest(MessageDigest::sha256())?),
        uris: cert
            .subject_alt_names()
            .into_iter()
            .flatten()
            .filter_map(|name| name.uri().map(str::to_string))
            .collect(),
        issuer: hex(&openssl::sha::sha256(&cert.issuer_name().to_der()?)),
        serial: cert.serial_number().to_bn()?.to_hex_str()?.to_string(),
        not_after: i64::from(until.days) * 86_400 + i64::from(until.secs),
    })
}

/// TCP connector for our HTTPS clients (KME-to-KME, `kme-bench load`) that sets TCP_NODELAY.
///
/// awc writes a request's head and body as separate TLS records; with Nagle's algorithm on,
/// the body waits for the ACK of the head, which the server delays by up to 40 ms. Every
/// KME-to-KME round trip would pay that. (The servers set it in [`on_connect`].)
#[derive(Clone, Default)]
pub struct NoDelayTcp(actix_tls::connect::ConnectorService);

impl actix_service::Service<actix_tls::connect::ConnectInfo<awc::http::Uri>> for NoDelayTcp {
    type Response = actix_tls::connect::Connection<awc::http::Uri, TcpStream>;
    type Error = actix_tls::connect::ConnectError;
    type Future =
        futures_util::future::LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, request: actix_tls::connect::ConnectInfo<awc::http::Uri>) -> Self::Future {
        let connecting = self.0.call(request);
        Box::pin(async move {
            let connection = connecting.await?;
            // Best effort: a socket without NODELAY is slower, not wrong.
            let _ = connection.io_ref().set_nodelay(true);
            Ok(connection)
        })
    }
}

/// An HTTPS client over `connector`, with TCP_NODELAY and at most `connections` per host.
pub fn https_client(
    connector: SslConnector,
    connections: usize,
    timeout: std::time::Duration,
) -> awc::Client {
    awc::Client::builder()
        .connector(
            awc::Connector::new()
                .connector(NoDelayTcp::default())
                .openssl(connector)
                .limit(connections),
        )
        .timeout(timeout)
        .finish()
}
