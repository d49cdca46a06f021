#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = berth::attestation::x509::describe(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = berth::attestation::x509::parse_certificate(text);
    }
});
