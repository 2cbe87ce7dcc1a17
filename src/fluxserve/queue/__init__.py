"""Dispatch: embedded (SQLite, worker threads claiming from the jobs table: worker.py) or procrastinate on
PostgreSQL (pg.py: queue entries, stall sweeps; listen.py: cross-node wake-ups; runner.py: GPU workers)."""
