"""Jobs: a build, forge or GGUF export request in, a job's progress events and its end out.

Takes a `BuildRequest` (recipe text, output, settings, the user's token), a `ForgeRequest`
(base, examples, output, training settings) or an `ExportRequest` (a build and its GGUF
file); runs one job at a time, every kind in one line, each in its own child process
(`python -m workbench.jobs.child`), streams its progress as `JobEvent`s, keeps them for any
page of the owner's session, reports queue places, and cancels on request. A crash in the
child never takes the server down.

    job     the requests, JobEvent, and the Job that keeps its events for every follower
    queue   the runner: BuildQueue, one child at a time, queue places, cancel
    child   the child side: one JSON request in, JSON events out
"""

from workbench.faces import face

EXPORTS = {
    "FINAL_KINDS": "job", "Job": "job", "JobEvent": "job", "BuildRequest": "job", "ForgeRequest": "job",
    "ExportRequest": "job",
    "BuildQueue": "queue", "QueueFull": "queue", "default_queue": "queue",
}
__getattr__, __dir__ = face(__name__, EXPORTS)
