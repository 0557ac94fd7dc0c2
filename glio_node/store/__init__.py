"""The node's SQL store: tables, sessions, migrations, the job queue and the audit trail."""
