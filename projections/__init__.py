"""Read models fed from the event log, each with its tracked position."""
