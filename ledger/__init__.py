"""An event-sourced double-entry ledger on PostgreSQL: the write side and the domain."""
