"""The job a request read, for its response's head: api.jobheaders adds Server-Timing from it to every
answer that read or waited on a job, and an ETag to a poll. JobService notes each job it reads for a request;
the holder is set per request by the middleware (outside a request nothing is noted)."""

from __future__ import annotations

from contextvars import ContextVar

from .job import Job

JOB_READ: ContextVar[list[Job] | None] = ContextVar("fluxserve_job_read", default=None)


def note(job: Job) -> Job:
    """The last job read is the one the answer is about."""
    holder = JOB_READ.get()
    if holder is not None:
        holder[:] = [job]
    return job
