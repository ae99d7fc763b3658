//! Webhook delivery: Standard Webhooks signatures (<https://www.standardwebhooks.com/>) over
//! an HTTP client that refuses private targets.
//!
//! Each request carries `webhook-id` (the job id: receivers drop repeats), `webhook-timestamp`
//! (seconds) and `webhook-signature: v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`.
//! The key is shown to clients as `whsec_<base64>`.
//!
//! Server-side request forgery: unless allowed by config, a target that is, or resolves to,
//! a loopback, private, link-local, CGNAT, multicast or unspecified address is refused. The
//! check sits in the client's DNS resolver, so the address connected to is the one checked
//! (no DNS rebinding between check and connect), redirects are not followed, and proxies
//! from the environment (`HTTP_PROXY` and the like) are never used.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::Sha256;
use tracing::Instrument;

use crate::traces;

/// Why a delivery did not land.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// No retry can help: a refused or malformed target, or the receiver said `410 Gone`.
    #[error("{0}")]
    Refused(String),
    /// Try again later: network errors, timeouts, non-2xx answers.
    #[error("{0}")]
    Failed(String),
}

/// The host a webhook URL points at (lower case, without port), if it names one.
pub fn target_host(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
}

/// `whsec_` + base64, the form Standard Webhooks libraries take.
pub fn secret_text(key: &[u8]) -> String {
    format!("whsec_{}", BASE64.encode(key))
}

/// The `webhook-signature` header value for one message.
pub fn signature(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Whether `ip` is a public unicast address. An IPv6 address that carries an IPv4 one
/// (mapped, compatible, NAT64, 6to4, Teredo) is judged by the IPv4 address it reaches.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [o0, o1, ..] = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_broadcast()
                || a.is_documentation()
                || a.is_unspecified()
                || a.is_multicast()
                || o0 == 0
                || o0 >= 240
                || (o0 == 100 && (o1 & 0xc0) == 64)) // 100.64.0.0/10, carrier-grade NAT
        }
        IpAddr::V6(a) => {
            if let Some(v4) = embedded_ipv4(a) {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001) // local-use NAT64
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // discard-only
        }
    }
}

/// The IPv4 address an IPv6 one leads to, for the forms that embed one.
fn embedded_ipv4(a: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = a.segments();
    let low = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated); `::` and `::1`
        // are themselves.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => Some(low(hi, lo)),
        // 64:ff9b::/96, the NAT64 well-known prefix.
        [0x0064, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        // 2002::/16, 6to4: the gateway's address in the next 32 bits.
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        // 2001::/32, Teredo: the client's address, inverted, in the last 32 bits.
        [0x2001, 0, .., hi, lo] => Some(low(!hi, !lo)),
        _ => None,
    }
}

/// Resolves names and keeps only addresses a delivery may go to.
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

pub struct WebhookSender {
    client: reqwest::Client,
    allow_private: bool,
}

impl WebhookSender {
    pub fn new(timeout: Duration, allow_private: bool) -> crate::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy named by the environment would connect from its own network, to an
            // address this process never checked.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .user_agent(concat!("DataFlow-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::Error::Config(format!("webhook client: {e}")))?;
        Ok(Self {
            client,
            allow_private,
        })
    }

    /// Checks a target before anything is sent: scheme, host, and (for address literals,
    /// which skip the resolver) the address itself; then names resolve through the guard.
    async fn check_target(&self, url: &str) -> Result<reqwest::Url, DeliveryError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| DeliveryError::Refused(format!("webhook_url is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DeliveryError::Refused(
                "webhook_url must be http or https".into(),
            ));
        }
        let Some(host) = parsed.host() else {
            return Err(DeliveryError::Refused("webhook_url has no host".into()));
        };
        if self.allow_private {
            return Ok(parsed);
        }
        let literal = match host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(_) => None,
        };
        if let Some(ip) = literal
            && !is_public(ip)
        {
            return Err(DeliveryError::Refused(format!(
                "webhook target {ip} is not a public address (set jobs.webhook_allow_private to allow)"
            )));
        }
        if literal.is_none() {
            let name = parsed.host_str().unwrap_or_default();
            let port = parsed.port_or_known_default().unwrap_or(443);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| DeliveryError::Failed(format!("resolving {name}: {e}")))?
                .collect();
            if !addrs.is_empty() && !addrs.iter().any(|a| is_public(a.ip())) {
                return Err(DeliveryError::Refused(format!(
                    "webhook target {name} resolves only to non-public addresses \
                     (set jobs.webhook_allow_private to allow)"
                )));
            }
        }
        Ok(parsed)
    }

    /// Sends one signed event; `Ok` carries the receiver's 2xx status.
    pub async fn deliver(
        &self,
        url: &str,
        msg_id: &str,
        key: &[u8],
        body: String,
    ) -> Result<u16, DeliveryError> {
        // A client span; the receiver continues its trace from the `traceparent` header.
        let span = tracing::info_span!(
            "webhook.post",
            otel.name = "POST",
            otel.kind = "client",
            "http.request.method" = "POST",
            "http.response.status_code" = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let traceparent = traces::of(&span);
        let delivered = self
            .post(url, msg_id, key, body, traceparent.as_deref())
            .instrument(span.clone())
            .await;
        match &delivered {
            Ok(status) => {
                span.record("http.response.status_code", u64::from(*status));
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
        delivered
    }

    async fn post(
        &self,
        url: &str,
        msg_id: &str,
        key: &[u8],
        body: String,
        traceparent: Option<&str>,
    ) -> Result<u16, DeliveryError> {
        let target = self.check_target(url).await?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let sig = signature(key, msg_id, timestamp, body.as_bytes());
        let mut request = self
            .client
            .post(target)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sig);
        if let Some(traceparent) = traceparent {
            request = request.header(traces::TRACEPARENT, traceparent);
        }
        let response = request.body(body).send().await.map_err(|e| {
            DeliveryError::Failed(format!("webhook request failed: {}", error_chain(&e)))
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else if status == reqwest::StatusCode::GONE {
            Err(DeliveryError::Refused(
                "the receiver answered 410 Gone".into(),
            ))
        } else {
            Err(DeliveryError::Failed(format!(
                "the receiver answered {status}"
            )))
        }
    }
}

/// An error with its causes, since reqwest's own message hides the interesting part.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = BASE64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(secret_text(&key), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    }

    #[test]
    fn private_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            // NAT64, 6to4, IPv4-compatible and Teredo forms of private addresses.
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::",
            "::127.0.0.1",
            "::10.0.0.1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }
}
