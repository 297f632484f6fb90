#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = luna_fuzz::Target::RequestJson.run(data);
});
