#![no_main]
libfuzzer_sys::fuzz_target!(|data: &str| {
    if let Ok(token) = berth::attestation::sas::SasToken::parse(data) {
        let _ = token.signed_with(b"key");
    }
});
