//! An engine's `/metrics` body as the scraper reads it: parsed as
//! Prometheus text and as OpenMetrics, recognised, and reduced to the
//! engine signals, for any bytes (a truncated scrape, garbage, another
//! exporter). It must not panic; what it reads is finite and in range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use podgpu_agent::engines::catalog::EngineKind;
use podgpu_agent::engines::exposition::Exposition;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else { return };
    for openmetrics in [false, true] {
        let Ok(exposition) = Exposition::parse(body, openmetrics) else { continue };
        for engine in std::iter::once(None).chain(EngineKind::all().map(Some)) {
            let Ok(reading) = exposition.read(engine) else { continue };
            for value in [reading.requests_waiting, reading.requests_running, reading.kv_cache_fraction].into_iter().flatten() {
                assert!(value.is_finite(), "a non-finite value was read: {value}");
            }
            if let Some(ttft) = reading.ttft {
                assert_eq!(ttft.bounds_s.len(), ttft.cumulative.len());
                assert!(ttft.bounds_s.windows(2).all(|pair| pair[0] <= pair[1]), "bounds sorted");
            }
        }
    }
});
