"""The fault-injection suite behind scripts/chaos, by part: common (constants, logging, HTTP),
stack (the private stack), load (the clients), faults (the schedule), checks (the invariants)."""
