"""Stream processors: they decide. Decisions are pure functions here; Faust agents only move records."""
