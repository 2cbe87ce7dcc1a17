"""Upstream providers: hosted APIs (BFL, Replicate, fal, any OpenAI Images server) as workers of the one job core.

config.py: the ``[upstreams.NAME]`` tables. bfl.py, replicate.py, fal.py, openai.py: each kind's request and
result shapes (base.py: what they share; providers.py: by name).
worker.py: UpstreamWorker, a queue worker that runs many jobs at once, each a provider task whose id is
recorded before it is polled (a restarted worker resumes it, never submits twice). Spill-over and failover are
JobService's fenced transitions of a job between routes. Nothing here imports torch.
"""
