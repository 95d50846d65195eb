"""Benchmarks and reports: quality against the baselines, the ablation, hit rates, lookup
latency, the daemon under concurrent clients, RPC overhead and the Cache Attention kernel."""
