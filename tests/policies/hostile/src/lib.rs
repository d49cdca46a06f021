//! A hostile allocation policy for Berth's sandbox tests. What it does depends on the
//! registration ID: `loop-…` spins forever, `bomb-…` allocates until memory runs out,
//! `huge-…` returns a 1 MB payload, `trap-…` panics, `unlinked-…` names a hub that is not
//! linked, `badtwin-…` returns invalid JSON as the twin, `chatty-…` logs far too much; any
//! other ID is allocated normally to the first linked hub with a payload.

#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "../../../wit", world: "allocation-policy" });

use berth::policy::log::{log, Level};


struct Hostile;

impl Guest for Hostile {
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
        let id = request.device.registration_id.as_str();
        let first = request.linked_hubs.first().map(|h| h.name.clone());
        if id.starts_with("loop-") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if id.starts_with("bomb-") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if id.starts_with("trap-") {
            panic!("the hostile policy panics on purpose");
        }
        if id.starts_with("chatty-") {
            for i in 0..5_000 {
                log(Level::Info, &format!("line {i} of a very chatty policy"));
            }
        }
        let hub = if id.starts_with("unlinked-") { Some("nowhere.example.net".to_owned()) } else { first };
        let Some(hub) = hub else { return Err(AllocationError::HubNotSpecified) };
        let payload = if id.starts_with("huge-") {
            format!("\"{}\"", "x".repeat(1 << 20))
        } else {
            "{\"ok\":true}".to_owned()
        };
        let initial_twin = id.starts_with("badtwin-").then(|| "{not json".to_owned());
        Ok(Allocation { hub, device_id: None, initial_twin, payload: Some(payload) })
    }
}

export!(Hostile);
