"""What completions spend: the ledger (record, SQL, reports, /api/usage), the budgets and
their reservations, cost lookups, model prices and spend alerts."""
