//! SLO-driven protection as a request sees it: its priority class (`spec.priorities`), and
//! what the SLOs covering its route ask for now ([`Protection`], from
//! [`crate::slo::Tracker::protecting`]).

use apipolicy_api::PriorityConfig;
use http::HeaderName;

use crate::headers::RequestHeaders;

/// A request's priority class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Class {
    Critical,
    #[default]
    Default,
    Sheddable,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Critical, Class::Default, Class::Sheddable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Default => "default",
            Self::Sheddable => "sheddable",
        }
    }

    /// Its place in [`Class::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `spec.priorities`, routes by index.
#[derive(Default)]
pub struct Priorities(Vec<Rule>);

struct Rule {
    class: Class,
    header: Option<(HeaderName, Vec<Vec<u8>>)>,
    routes: Vec<usize>,
}

impl Priorities {
    /// The rules of `config`, with route names turned into indices by `route_index`.
    pub fn new(config: &[PriorityConfig], route_index: impl Fn(&str) -> Option<usize>) -> Self {
        Self(
            config
                .iter()
                .map(|p| Rule {
                    class: if p.sheddable { Class::Sheddable } else { Class::Critical },
                    header: p.header.as_ref().and_then(|(name, values)| {
                        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                        Some((name, values.iter().map(|v| v.as_bytes().to_vec()).collect()))
                    }),
                    routes: p.routes.iter().filter_map(|r| route_index(r)).collect(),
                })
                .collect(),
        )
    }

    /// The class of a request on route `route`: the first rule it matches, else Default.
    pub fn classify(&self, route: usize, headers: &impl RequestHeaders) -> Class {
        self.0
            .iter()
            .find(|r| {
                r.routes.contains(&route)
                    || r.header.as_ref().is_some_and(|(name, values)| {
                        headers.first(name).is_some_and(|v| values.iter().any(|want| want == v))
                    })
            })
            .map_or(Class::Default, |r| r.class)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What protection asks of a request's route now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// Cached routes answer with any stored entry rather than ask the app.
    pub serve_stale: bool,
    /// Sheddable requests that would reach the app get 503.
    pub shed: bool,
    /// Rate limits keep this share of their rate, in thousandths.
    pub tighten_permille: Option<u32>,
}

impl Protection {
    /// Both protections of two SLOs at once: the stricter of each.
    pub fn and(self, other: Protection) -> Protection {
        Protection {
            serve_stale: self.serve_stale || other.serve_stale,
            shed: self.shed || other.shed,
            tighten_permille: match (self.tighten_permille, other.tighten_permille) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    #[test]
    fn the_first_rule_a_request_matches_gives_its_class() {
        let config: Vec<PriorityConfig> = serde_json::from_value(serde_json::json!([
            {"sheddable": false, "header": ["x-tier", ["gold"]]},
            {"sheddable": true, "header": ["x-priority", ["low", "batch"]]},
            {"sheddable": true, "routes": ["reports"]},
        ]))
        .unwrap();
        let p = Priorities::new(&config, |name| (name == "reports").then_some(3));
        let h = |pairs: &[(&'static str, &'static str)]| -> HeaderMap {
            pairs.iter().map(|(n, v)| (HeaderName::from_static(n), v.parse().unwrap())).collect()
        };
        assert_eq!(p.classify(0, &h(&[])), Class::Default);
        assert_eq!(p.classify(0, &h(&[("x-priority", "batch")])), Class::Sheddable);
        assert_eq!(p.classify(3, &h(&[])), Class::Sheddable);
        assert_eq!(p.classify(3, &h(&[("x-tier", "gold")])), Class::Critical, "first match wins");
        assert_eq!(p.classify(0, &h(&[("x-priority", "LOW")])), Class::Default, "values are exact");
    }
}
