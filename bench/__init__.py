"""setpoint benchmarks: run by hand (`make bench`), never as tests."""
