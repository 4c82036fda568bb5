"""The throw-away systemd container (overlay + systemd-nspawn) for tests."""
