//! Built-in allocation policies (seed ALLOC-01..17): pure functions from a device and a set of
//! candidate hubs to one hub. Custom allocation lives beside them: `custom` (its decision and
//! failures) and `webhook` (the Azure-compatible webhook client); WebAssembly policies run in
//! `crate::policy`.
//!
//! - **hashed** ("evenly weighted distribution"): weighted rendezvous hashing of the
//!   registration ID. Each hub scores `-ln(u) / weight` with `u` a hash of (registration ID,
//!   hub) mapped into (0, 1); the lowest score wins. A hub gets a share of devices equal to
//!   its weight over the total, a device always lands on the same hub while the hub set is
//!   unchanged, and linking a new hub moves only the devices it wins: its weight's share.
//! - **geoLatency**: Berth cannot measure a device's latency, so the operator maps client
//!   address ranges to locations (`geo` in the configuration); the hubs whose `location`
//!   equals the device's location are the nearest. Among them (or among all candidates when
//!   the device's address maps to no location, or no hub is there) the hashed policy decides,
//!   as DPS hashes across hubs of equal latency (ALLOC-10).
//! - **static**: the one hub the enrollment names.

pub mod custom;
pub mod webhook;

use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::hubs::LinkedHub;

/// Address ranges mapped to hub locations, for geoLatency. Longest prefix wins.
#[derive(Debug, Clone, Default)]
pub struct GeoMap {
    ranges: Vec<(IpNet, String)>,
}

impl GeoMap {
    /// Parses entries of the form `10.0.0.0/8=west`.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for entry in entries {
            let (range, location) = entry
                .split_once('=')
                .ok_or_else(|| format!("geo entry '{entry}' is not CIDR=LOCATION"))?;
            let net: IpNet = range
                .trim()
                .parse()
                .map_err(|_| format!("geo entry '{entry}': '{range}' is not an address range"))?;
            let location = location.trim();
            if location.is_empty() {
                return Err(format!("geo entry '{entry}' has no location"));
            }
            ranges.push((net, location.to_owned()));
        }
        ranges.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Ok(Self { ranges })
    }

    /// The location of `address`, if a range covers it.
    pub fn locate(&self, address: IpAddr) -> Option<&str> {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        self.ranges
            .iter()
            .find(|(net, _)| net.contains(&address))
            .map(|(_, location)| location.as_str())
    }
}

/// A uniform number in (0, 1) from the pair, stable across runs and platforms.
fn unit_hash(registration_id: &str, hub: &str) -> f64 {
    let digest = Sha256::new()
        .chain_update(registration_id.to_ascii_lowercase().as_bytes())
        .chain_update([0u8])
        .chain_update(hub.to_ascii_lowercase().as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // 53 random bits, offset by half a step so the value is never 0 or 1.
    // 53 bits fit an f64 mantissa exactly.
    #[allow(clippy::cast_precision_loss)]
    let (mantissa, scale) = (
        (u64::from_be_bytes(bytes) >> 11) as f64,
        (1u64 << 53) as f64,
    );
    (mantissa + 0.5) / scale
}

/// Weighted rendezvous hashing over `hubs` (weights below 1 count as 1).
pub fn hashed<'a>(registration_id: &str, hubs: &[&'a LinkedHub]) -> Option<&'a LinkedHub> {
    hubs.iter()
        .map(|hub| {
            #[allow(clippy::cast_precision_loss)]
            let weight = hub.allocation_weight.max(1) as f64;
            (-unit_hash(registration_id, &hub.name).ln() / weight, *hub)
        })
        .min_by(|(a, _), (b, _)| a.total_cmp(b))
        .map(|(_, hub)| hub)
}

/// The hubs at the device's location, hashed; all candidates when none is there.
pub fn geo_latency<'a>(
    registration_id: &str,
    location: Option<&str>,
    hubs: &[&'a LinkedHub],
) -> Option<&'a LinkedHub> {
    let near: Vec<&LinkedHub> = match location {
        Some(location) => hubs
            .iter()
            .copied()
            .filter(|hub| {
                hub.location
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(location))
            })
            .collect(),
        None => Vec::new(),
    };
    if near.is_empty() {
        hashed(registration_id, hubs)
    } else {
        hashed(registration_id, &near)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, weight: i64, location: Option<&str>) -> LinkedHub {
        LinkedHub {
            name: name.to_owned(),
            connection_string: None,
            allocation_weight: weight,
            apply_allocation_policy: true,
            location: location.map(str::to_owned),
        }
    }

    #[test]
    fn weighted_distribution_matches_the_weights() {
        let hubs = [
            hub("a.example", 1, None),
            hub("b.example", 3, None),
            hub("c.example", 6, None),
        ];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let devices = 20_000;
        let mut counts = [0usize; 3];
        for i in 0..devices {
            let chosen = hashed(&format!("device-{i}"), &refs).unwrap();
            counts[hubs.iter().position(|h| h.name == chosen.name).unwrap()] += 1;
        }
        // Expected shares 10%, 30%, 60%; tolerance ±1.5 percentage points at 20,000 devices
        // (over 4 standard deviations of a binomial at this size).
        for (count, expected) in counts.iter().zip([0.1, 0.3, 0.6]) {
            #[allow(clippy::cast_precision_loss)]
            let share = *count as f64 / f64::from(devices);
            assert!(
                (share - expected).abs() < 0.015,
                "share {share} vs {expected}: {counts:?}"
            );
        }
    }

    #[test]
    fn linking_a_hub_moves_only_its_share() {
        let before = [hub("a.example", 1, None), hub("b.example", 1, None)];
        let after = [
            hub("a.example", 1, None),
            hub("b.example", 1, None),
            hub("c.example", 2, None),
        ];
        let (before_refs, after_refs): (Vec<&LinkedHub>, Vec<&LinkedHub>) =
            (before.iter().collect(), after.iter().collect());
        let devices = 20_000;
        let mut moved = 0;
        for i in 0..devices {
            let id = format!("device-{i}");
            let old = hashed(&id, &before_refs).unwrap();
            let new = hashed(&id, &after_refs).unwrap();
            if old.name != new.name {
                assert_eq!(
                    new.name, "c.example",
                    "a device only ever moves to the new hub"
                );
                moved += 1;
            }
        }
        // The new hub's share is 2 / 4 = 50%; tolerance ±1.5 points.
        #[allow(clippy::cast_precision_loss)]
        let share = f64::from(moved) / f64::from(devices);
        assert!((share - 0.5).abs() < 0.015, "moved {share}");
    }

    #[test]
    fn assignment_is_stable_and_case_insensitive() {
        let hubs = [hub("a.example", 1, None), hub("b.example", 1, None)];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        assert_eq!(
            hashed("Device-1", &refs).unwrap().name,
            hashed("device-1", &refs).unwrap().name
        );
        assert!(hashed("x", &[]).is_none());
    }

    #[test]
    fn geo_latency_prefers_the_devices_location() {
        let hubs = [
            hub("west.example", 1, Some("west")),
            hub("east1.example", 1, Some("east")),
            hub("east2.example", 1, Some("East")),
        ];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let map = GeoMap::parse(["10.0.0.0/8=east", "10.1.0.0/16=west", "::1/128=west"]).unwrap();
        assert_eq!(
            map.locate("10.1.2.3".parse().unwrap()),
            Some("west"),
            "longest prefix wins"
        );
        assert_eq!(map.locate("10.9.2.3".parse().unwrap()), Some("east"));
        assert_eq!(map.locate("::ffff:10.9.2.3".parse().unwrap()), Some("east"));
        assert_eq!(map.locate("192.0.2.1".parse().unwrap()), None);
        for i in 0..200 {
            let chosen = geo_latency(&format!("d{i}"), Some("east"), &refs).unwrap();
            assert!(chosen.name.starts_with("east"));
        }
        assert!(
            geo_latency("d", Some("north"), &refs).is_some(),
            "no hub there: all candidates"
        );
        assert!(GeoMap::parse(["nonsense"]).is_err());
        assert!(GeoMap::parse(["10.0.0.0/33=x"]).is_err());
    }
}
