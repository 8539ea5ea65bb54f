//! The metrics of one KME, in a Prometheus registry of its own (several KMEs may share a
//! process, as in the tests, and each reports only its own).
//!
//! Counters and histograms are updated where things happen: the SAE API edge (requests by
//! endpoint and status, latency, keys handed out, refusals by reason), the writer (commit
//! latency, batch size, audit records by event, so key expiry, relays released or burned and
//! every other audited event are counted the same way), `PeerLink` (round-trip time of peer
//! requests). Levels that the actors own (pools, link state, QBER, rates, authentication
//! windows, database size) are read when `/metrics` is scraped, not mirrored here.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    /// SAE API requests by `endpoint` (status, enc_keys, dec_keys, info) and HTTP `code`.
    pub sae_requests: IntCounterVec,
    pub sae_request_seconds: HistogramVec,
    /// Keys handed to SAEs: `direction` "delivered" (enc_keys) or "retrieved" (dec_keys).
    pub sae_keys: IntCounterVec,
    /// Requests refused, by `reason` (the error's kind: unauthorized, rate_limited, ...).
    pub refusals: IntCounterVec,
    /// Audit records committed, by `event`.
    pub audit_records: IntCounterVec,
    pub commit_seconds: Histogram,
    /// Operations per storage transaction.
    pub batch_operations: Histogram,
    /// KME-to-KME requests by `peer`, from sending to the answer.
    pub peer_request_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("kme".into()), None)?;
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, _> {
            let family = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };
        let sae_requests = counter(
            "sae_requests_total",
            "SAE API requests by endpoint and HTTP status",
            &["endpoint", "code"],
        )?;
        let sae_keys = counter(
            "sae_keys_total",
            "Keys handed to SAEs: delivered by enc_keys, retrieved by dec_keys",
            &["direction"],
        )?;
        let refusals = counter(
            "refusals_total",
            "SAE requests refused, by reason",
            &["reason"],
        )?;
        let audit_records = counter(
            "audit_records_total",
            "Audit records committed, by event",
            &["event"],
        )?;
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let family = HistogramVec::new(opts, labels)?;
            registry.register(Box::new(family.clone()))?;
            Ok::<_, prometheus::Error>(family)
        };
        let sae_request_seconds = histogram(
            "sae_request_seconds",
            "SAE API request latency by endpoint",
            &["endpoint"],
        )?;
        let peer_request_seconds = histogram(
            "peer_request_seconds",
            "KME-to-KME request round trip by peer",
            &["peer"],
        )?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("store_commit_seconds", "Storage transaction latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(commit_seconds.clone()))?;
        let batch_operations = Histogram::with_opts(
            HistogramOpts::new(
                "store_batch_operations",
                "Operations per storage transaction",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 14)?),
        )?;
        registry.register(Box::new(batch_operations.clone()))?;
        Ok(Self {
            registry,
            sae_requests,
            sae_request_seconds,
            sae_keys,
            refusals,
            audit_records,
            commit_seconds,
            batch_operations,
            peer_request_seconds,
        })
    }

    /// The text exposition of every metric here and of `levels` (a registry of gauges read
    /// at scrape time).
    pub fn render(&self, levels: &Registry) -> Result<String, prometheus::Error> {
        let mut families = self.registry.gather();
        families.extend(levels.gather());
        TextEncoder::new().encode_to_string(&families)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_registers_and_renders() {
        let metrics = Metrics::new().unwrap();
        metrics
            .sae_requests
            .with_label_values(&["enc_keys", "200"])
            .inc();
        metrics.commit_seconds.observe(0.001);
        let text = metrics.render(&Registry::new()).unwrap();
        assert!(text.contains("kme_sae_requests_total{code=\"200\",endpoint=\"enc_keys\"} 1"));
        assert!(text.contains("kme_store_commit_seconds_count 1"));
    }
}
