"""Jobs: a build or forge request in, a job's progress events and its end out.

Takes a `BuildRequest` (recipe text, output, settings, the user's token) or a
`ForgeRequest` (base, examples, output, training settings); runs one job at a time, builds
and forges in one line, each in its own child process (`python -m workbench.jobs.child`), streams its
progress as `JobEvent`s, reports queue places, and cancels on request. A crash in the
child never takes the server down.

    queue   the runner: BuildQueue, Job, JobEvent, one child at a time
    child   the child side: one JSON request in, JSON events out
"""

from workbench.faces import face

EXPORTS = {
    "FINAL_KINDS": "queue", "BuildQueue": "queue", "BuildRequest": "queue", "Job": "queue",
    "JobEvent": "queue", "QueueFull": "queue", "default_queue": "queue", "ForgeRequest": "queue",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
