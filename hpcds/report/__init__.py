"""`hpcds report`: where a run's time went. `core` computes it from the run's logs (no I/O), `read` reads a run
directory for it, `png` draws it (matplotlib, imported only there)."""
