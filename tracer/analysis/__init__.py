"""The rules, as pure functions over state snapshots: attribution (who made a key), forecast
(when the table runs out), verdicts (leaking, critical), scan (the live tables now), and the
Ledger that answers these questions over a tracker's state."""
