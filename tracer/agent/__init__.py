"""keytrace agent: always on, host-wide, exported to Prometheus (a front-end, like cli/)."""
