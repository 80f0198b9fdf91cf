"""The fault harness: child processes, failpoints, the oracle, the TCP proxy, quiescence
detection, the invariants I1-I6 and the summary table."""
