//! `crm-bench soak`: P8's third bar. P1's load (ListPrograms with the service token, 4 × 64
//! streams = 256 in flight) for `--soak-secs` (600 by default) against one server, its RSS
//! sampled every 10 s. Growth is the last sample over the sample at one minute: < 5%.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    load::{self, CONNECTIONS, GRPC, LIST_PROGRAMS, STREAMS, TE},
    outcome::Outcome,
    process::{ServerHome, TOKEN},
};

const EVERY: Duration = Duration::from_secs(10);

pub fn run(work: &Path, secs: u64) -> anyhow::Result<Outcome> {
    if secs < 30 {
        bail!("a soak needs at least 30 s (--soak-secs)");
    }
    let server = ServerHome::new(work, "soak", None, &[])?.serve()?;
    let url = server.url(LIST_PROGRAMS);
    let headers = [GRPC, TE, ("x-service-token", TOKEN)];
    let name = "crm_requests_total";
    let before = load::outcomes(&server, name, LIST_PROGRAMS)?;
    // The reference: one minute in (or halfway through a shorter soak).
    let reference_at = Duration::from_secs(60.min(secs / 2));
    let started = Instant::now();
    let (answered, samples) = std::thread::scope(|s| -> anyhow::Result<_> {
        let h2load = s.spawn(|| load::h2load(work, &url, &headers, secs, CONNECTIONS, STREAMS));
        let mut samples: Vec<(Duration, f64)> = Vec::new();
        let mut next = started + EVERY;
        while next + Duration::from_secs(1) < started + Duration::from_secs(secs) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let rss = server.rss_mib()?;
            println!(
                "  soak {:>4} s  RSS {rss:.1} MiB",
                (next - started).as_secs()
            );
            samples.push((next - started, rss));
            next += EVERY;
        }
        let answered = match h2load.join() {
            Ok(result) => result?,
            Err(_) => bail!("the h2load thread panicked"),
        };
        Ok((answered, samples))
    })?;
    let reference = samples
        .iter()
        .find(|(t, _)| *t >= reference_at)
        .or(samples.first())
        .map(|s| s.1)
        .unwrap_or(f64::NAN);
    let end = samples.last().map(|s| s.1).unwrap_or(f64::NAN);
    let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    let mut o =
        Outcome::new("P8", "soak: RSS at the end over RSS after the first minute").at_most(1.05);
    o.values = vec![end / reference];
    o.absolutes = format!(
        "{reference:.1} → {end:.1} MiB (peak {peak:.1}) over {secs} s at 256 in flight, \
         {answered} calls ({:.0}/s)",
        answered as f64 / secs as f64
    );
    let after = load::outcomes(&server, name, LIST_PROGRAMS)?;
    o.failures = load::check_counts("soak", &before, &after, answered as f64, 1.0, false);
    if let Some(logs) = server.log_summary() {
        o.absolutes.push_str(&format!("; {logs}"));
    }
    Ok(o)
}
