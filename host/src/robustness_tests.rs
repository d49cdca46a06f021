//! Parsers of outside input never panic: each is fed many pseudo-random and mutated inputs.
//! (The cargo-fuzz targets in `host/fuzz/` explore further; this runs on stable in CI.)

use crate::attestation::sas::SasToken;
use crate::attestation::x509::parse_certificate;
use crate::hubs::HubConnectionString;
use crate::service_api::query;

/// xorshift64*: deterministic, so a failure reproduces.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn text(&mut self, alphabet: &[u8], max: usize) -> String {
        let len = usize::try_from(self.next() % (max as u64 + 1)).unwrap();
        (0..len)
            .map(|_| {
                char::from(alphabet[usize::try_from(self.next() % alphabet.len() as u64).unwrap()])
            })
            .collect()
    }

    fn mutate(&mut self, seed: &str) -> String {
        let mut bytes = seed.as_bytes().to_vec();
        for _ in 0..=(self.next() % 4) {
            if bytes.is_empty() {
                break;
            }
            let at = usize::try_from(self.next() % bytes.len() as u64).unwrap();
            match self.next() % 3 {
                0 => bytes[at] = u8::try_from(self.next() % 128).unwrap(),
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"=&%'\"` *"[usize::try_from(self.next() % 8).unwrap()]),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

const ALPHABET: &[u8] = b"SharedAccessSignature sr=sig=se=skn=&%2F%3Dabc019+/=;:'\"`*SELECT FROM WHERE AND = -----BEGIN CERTIFICATE";

#[test]
fn parsers_survive_random_and_mutated_input() {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let seeds = [
        crate::attestation::sas::build_token(
            "host:8443/enrollments",
            b"key",
            Some("owner"),
            1_900_000_000,
        ),
        "SELECT * FROM enrollments WHERE deviceId = 'a' AND provisioningStatus = \"enabled\""
            .to_owned(),
        "HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0".to_owned(),
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----".to_owned(),
    ];
    for round in 0..20_000 {
        let input = if round % 2 == 0 {
            noise.text(ALPHABET, 200)
        } else {
            let seed = &seeds[round / 2 % seeds.len()];
            noise.mutate(seed)
        };
        let _ = SasToken::parse(&input);
        let _ = query::parse(&input, "registrationId");
        let _ = HubConnectionString::parse(&input);
        if round % 10 == 0 {
            let _ = parse_certificate(&input);
        }
        let _ = crate::model::names::check_registration_id("id", &input);
        let _ = crate::model::names::check_host_name("hub", &input);
    }
}
