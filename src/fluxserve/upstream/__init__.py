"""Upstream providers: hosted APIs (BFL, Replicate, fal, any OpenAI Images server) as workers of the one job core.

config.py: the ``[upstreams.NAME]`` tables. providers.py: each kind's request and result shapes.
worker.py: UpstreamWorker, a queue worker that runs many jobs at once, each a provider task whose id is
recorded before it is polled (a restarted worker resumes it, never submits twice). routing.py: spill-over
and failover, fenced transitions of queued jobs between routes. Nothing here imports torch.
"""
