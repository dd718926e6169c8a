"""System layer: the whole stack's behaviour (launchers and tooling, the admin CLI, crash safety,
cluster, overload, security, migrations, concurrency, the feed across restarts, the dev stack)."""
