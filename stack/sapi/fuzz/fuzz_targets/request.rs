#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shunt_sapi::decode_check::request(data));
