//! Addresses module fetches may not reach, as Istio 1.30 refuses them: link-local ranges (where
//! cloud metadata services live) and the metadata addresses clouds publish outside them. A plugin
//! URL is operator input, but an `imagePullSecret` or a redirect can point anywhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Hosts whose names alone give them away.
const METADATA_HOSTS: [&str; 2] = ["metadata.google.internal", "metadata"];

pub(crate) fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_forbidden_v4(v4),
            None => {
                // fe80::/10 link-local; fd00:ec2::254 is AWS's IPv6 metadata endpoint.
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254)
            }
        },
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    // 169.254/16 holds AWS, GCP and Azure metadata; 100.100.100.200 is Alibaba's.
    ip.is_link_local() || ip == Ipv4Addr::new(100, 100, 100, 200)
}

pub(crate) fn is_forbidden_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    METADATA_HOSTS.contains(&host.as_str())
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(is_forbidden)
}

/// Resolves `host` and refuses it when any address is forbidden (so DNS cannot smuggle one in).
pub(crate) async fn check_host(host: &str, port: u16) -> Result<(), String> {
    if is_forbidden_host(host) {
        return Err(format!(
            "refusing to fetch from {host}: a link-local or cloud metadata address"
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    for address in addresses {
        if is_forbidden(address.ip()) {
            return Err(format!(
                "refusing to fetch from {host}: it resolves to {}, a link-local or cloud metadata address",
                address.ip()
            ));
        }
    }
    Ok(())
}

/// reqwest's resolver with the forbidden addresses taken out: a redirect to a name that resolves
/// into them fails to connect instead of reaching them.
pub(crate) struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if is_forbidden_host(&host) {
                return Err(format!("refusing {host}: a cloud metadata host").into());
            }
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_forbidden(a.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(format!(
                    "refusing {host}: it resolves only to link-local or cloud metadata addresses"
                )
                .into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub(crate) fn guarded_resolver() -> Arc<GuardedResolver> {
    Arc::new(GuardedResolver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_link_local_and_metadata_allows_loopback_and_private() {
        for forbidden in [
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_forbidden(forbidden.parse().unwrap()), "{forbidden}");
        }
        for allowed in ["127.0.0.1", "10.0.0.1", "192.168.1.1", "::1", "8.8.8.8"] {
            assert!(!is_forbidden(allowed.parse().unwrap()), "{allowed}");
        }
        assert!(is_forbidden_host("metadata.google.internal."));
        assert!(is_forbidden_host("[fe80::1]"));
        assert!(!is_forbidden_host("registry.example.com"));
    }
}
