//! Prometheus metrics and the HTTP endpoints (being written).
