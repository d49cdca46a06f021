#![no_main]
libfuzzer_sys::fuzz_target!(|data: &str| {
    let _ = berth::service_api::query::parse(data, "registrationId");
});
