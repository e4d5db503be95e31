"""Stage work as procrastinate jobs on a shared PostgreSQL state: the runners that do one
job of each queue with the stages' own code (:mod:`~aiworker.queue.runners`), the
procrastinate app and its tasks (:mod:`~aiworker.queue.tasks`), the sweep that re-defers
what lacks its job and retries the jobs of killed workers (:mod:`~aiworker.queue.sweep`),
and the worker that runs them (:mod:`~aiworker.queue.worker`)."""
