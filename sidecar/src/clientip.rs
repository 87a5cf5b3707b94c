//! Who the client is: the TCP peer, or, when the peer is a trusted proxy, the right-most
//! address of `X-Forwarded-For` that is not trusted. The left-most address is whatever the
//! client chose to write there, so it is never believed on its own.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::headers::{RequestHeaders, text};

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// A client address: an IP, or the raw text of an `X-Forwarded-For` entry that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client<'a> {
    Ip(IpAddr),
    Raw(&'a str),
}

impl TrustedProxies {
    /// From the compiled config, which `api` validated: entries that do not parse are skipped.
    pub fn new(entries: &[String]) -> Self {
        Self(
            entries
                .iter()
                .filter_map(|e| e.parse::<IpNet>().ok().or_else(|| e.parse::<IpAddr>().ok().map(IpNet::from)))
                .collect(),
        )
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn client<'a>(&self, peer: SocketAddr, headers: &'a impl RequestHeaders) -> Client<'a> {
        let peer = peer.ip().to_canonical();
        if !self.trusts(peer) {
            return Client::Ip(peer);
        }
        let mut leftmost = Client::Ip(peer);
        // The last header line holds the right-most entries.
        for value in headers.all(&X_FORWARDED_FOR).rev() {
            let Some(text) = text(value) else { return Client::Raw("") };
            for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
                match parse(entry) {
                    Some(ip) if self.trusts(ip) => leftmost = Client::Ip(ip),
                    Some(ip) => return Client::Ip(ip),
                    None => return Client::Raw(entry),
                }
            }
        }
        leftmost
    }
}

fn parse(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::HeaderMap;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> Client<'static> {
        Client::Ip(s.parse().unwrap())
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address() {
        let t = TrustedProxies::new(&["10.0.0.0/8".into(), "192.0.2.1".into()]);
        let lb: SocketAddr = "10.1.1.1:4000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.4:4000".parse().unwrap();
        assert_eq!(
            t.client(stranger, &headers(&["1.1.1.1"])),
            ip("198.51.100.4"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(t.client(lb, &headers(&[])), ip("10.1.1.1"));
        assert_eq!(t.client(lb, &headers(&["203.0.113.5"])), ip("203.0.113.5"));
        // A forged left-most entry gains nothing: the proxy appended the real client.
        assert_eq!(t.client(lb, &headers(&["6.6.6.6, 203.0.113.5"])), ip("203.0.113.5"));
        assert_eq!(t.client(lb, &headers(&["6.6.6.6, 203.0.113.5, 10.2.2.2, 192.0.2.1"])), ip("203.0.113.5"));
        assert_eq!(t.client(lb, &headers(&["6.6.6.6", "203.0.113.5, 10.2.2.2"])), ip("203.0.113.5"));
        assert_eq!(
            t.client(lb, &headers(&["10.3.3.3, 10.2.2.2"])),
            ip("10.3.3.3"),
            "all trusted: the left-most"
        );
        assert_eq!(t.client(lb, &headers(&["garbage, 10.2.2.2"])), Client::Raw("garbage"));
        assert_eq!(
            t.client("[::ffff:10.1.1.1]:80".parse().unwrap(), &headers(&["203.0.113.9:5555"])),
            ip("203.0.113.9")
        );
    }
}
