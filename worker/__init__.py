"""Job execution: the Celery app and tasks (distributed) and the embedded executor, both running
``worker.jobs.run_job``."""
