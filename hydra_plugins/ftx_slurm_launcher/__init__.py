"""The SLURM launcher of ``hydra/launcher=slurm``: hydra-submitit-launcher's, except
that a trial whose job ended without a result (cancelled with scancel, killed for
memory, its node lost) comes back as a failed trial instead of an exception that
discards the other trials of the batch. ftx's sweeper records it as failed (and
retries it when ``max_retry`` allows); ``ftx train -m`` reports it at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core import core, utils

        wait_for_results = core.Job.results

        def results(job: core.Job) -> list[Any]:
            try:
                return wait_for_results(job)
            except (utils.UncompletedJobError, utils.FailedJobError) as error:
                try:
                    overrides = list(job.submission().args[0])
                except Exception:  # the pickle of the submission may be gone with the job's folder
                    overrides = None
                failed = JobReturn(overrides=overrides, status=JobStatus.FAILED)
                failed.return_value = RuntimeError(f"SLURM job {job.job_id} ended without a result: {error}")
                return [failed]

        core.Job.results = results
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            core.Job.results = wait_for_results
