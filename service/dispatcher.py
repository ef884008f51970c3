"""The dispatcher: claims queued experiments and submits them as Ray jobs (issue item 5).

A claim is atomic across replicas (store.claim). After the claim, the validated spec is written
to the run folder and the job submitted with `submission_id` = the experiment id (`{id}-r{n}` for
retry n), so a replica that crashed after submitting cannot start the same attempt twice: Ray
refuses the duplicate and we adopt the job that is already there.
"""

from __future__ import annotations

import logging
import shlex
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cdsp_core import runs
from cdsp_core.spec import SpecError, validate_spec
from service import store
from service.models import Transition, utcnow
from service.ray_jobs import JobExists, JobNotFound, RayError, RayJobs, RayUnavailable
from service.settings import Settings
from service.states import Status

log = logging.getLogger(__name__)
# Consecutive refused submissions of one attempt before the experiment fails instead of requeueing.
MAX_SUBMIT_REFUSALS = 5
# Seconds a retry waits for a still-running earlier attempt to end once asked to stop (Ray sends
# SIGTERM, then SIGKILL a few seconds later); past it the claim goes back to the queue.
EARLIER_ATTEMPT_STOP_WAIT = 30.0
ENDED = ("STOPPED", "SUCCEEDED", "FAILED")


def entrypoint(template: str, run_dir: str) -> str:
    """The job's shell command: `{spec}` and `{out}` replaced by the shell-quoted run locations."""
    return template.format(spec=shlex.quote(runs.join(run_dir, runs.SPEC)), out=shlex.quote(run_dir))


class Dispatcher:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], ray: RayJobs):
        self.settings = settings
        self.sessions = sessions
        self.ray = ray

    def dispatch_once(self) -> int:
        """Claim what the concurrency limit allows and submit it; returns how many were submitted."""
        with self.sessions.begin() as s:
            claims = store.claim(s, self.settings.replica_id, self.settings.max_running)
        submitted = 0
        for i, claim in enumerate(claims):
            try:
                submitted += self._submit(claim)
            except RayUnavailable as exc:
                for rest in claims[i:]:  # Ray is down: everything claimed goes back to the queue
                    self._requeue(rest, f"Ray unreachable: {exc}")
                break
        return submitted

    def _submit(self, claim: store.Claim) -> int:
        try:
            spec = validate_spec(claim.spec, stored=True)
        except SpecError as exc:  # stored under an older spec version that this one no longer accepts
            self._fail(claim, f"the stored spec is no longer valid: {exc}")
            return 0
        try:
            runs.write_text(runs.join(claim.run_dir, runs.SPEC), spec.to_yaml())
        except Exception as exc:  # any storage backend error (OSError, botocore, ...)
            self._fail(claim, f"cannot write the spec to the run folder {claim.run_dir}: {exc}")
            return 0
        try:
            self._stop_earlier(claim)
        except RayError as exc:
            self._refused(claim, f"could not stop an earlier attempt: {exc}")
            return 0
        command = entrypoint(self.settings.job_entrypoint, claim.run_dir)
        metadata = {"experiment_id": claim.experiment_id, "name": spec.name, "kind": spec.kind}
        try:
            self.ray.submit(command, claim.submission_id, metadata)
        except JobExists:
            log.info("Ray already has job %s: adopting it", claim.submission_id)
        except RayError as exc:
            self._refused(claim, str(exc))
            return 0
        with self.sessions.begin() as s:
            store.update_fields(s, claim.experiment_id, submitted_at=utcnow())
            cancel = store.get(s, claim.experiment_id).cancel_requested
        if cancel:  # cancelled while we were submitting
            self._stop(claim.submission_id)
        log.info("submitted %s as Ray job %s", claim.experiment_id, claim.submission_id)
        return 1

    def _stop_earlier(self, claim: store.Claim) -> None:
        """A retry never runs beside an earlier attempt: one failed as lost with its cluster may still run
        there once the cluster answers again (the reconciler stops those too, but only the replica that
        saw the loss knows them, and only until it restarts). Both would write the same run folder."""
        for sid in claim.earlier_submission_ids():
            try:
                if not self.ray.stop(sid):
                    continue  # not running
                log.warning("stopping %s, an earlier attempt of %s that still runs", sid, claim.experiment_id)
                # Within half the claim's grace: past it another replica would put the claim back.
                wait = min(EARLIER_ATTEMPT_STOP_WAIT, self.settings.dispatch_grace / 2)
                deadline = time.monotonic() + wait
                while self.ray.info(sid).status not in ENDED:  # ended, not only asked to: then submit
                    if time.monotonic() > deadline:
                        raise RayError(f"{sid} did not stop within {wait:.0f} s")
                    time.sleep(0.5)
            except JobNotFound:
                pass

    def _stop(self, submission_id: str) -> None:
        try:
            self.ray.stop(submission_id)
        except (RayUnavailable, RayError) as exc:  # the reconciler asks again on its next pass
            log.warning("could not stop %s yet: %s", submission_id, exc)

    def _requeue(self, claim: store.Claim, reason: str) -> None:
        with self.sessions.begin() as s:
            store.transition(
                s,
                claim.experiment_id,
                Status.queued,
                reason,
                self.settings.replica_id,
                expect=[Status.dispatching],
                if_cancelled=_cancelled_before_ray(reason),
                claimed_by=None,
                claimed_at=None,
                submission_id=None,
                submitted_at=None,
            )

    def _refused(self, claim: store.Claim, reason: str) -> None:
        """Ray answered but refused: requeue (often transient, e.g. its job agent is starting), then fail."""
        with self.sessions.begin() as s:
            exp = store.get(s, claim.experiment_id)
            refusals = s.scalar(
                select(func.count()).where(
                    Transition.experiment_id == claim.experiment_id,
                    Transition.attempt == exp.attempt,
                    Transition.reason.like("Ray refused the job:%"),
                )
            )
        if (refusals or 0) + 1 >= MAX_SUBMIT_REFUSALS:
            self._fail(claim, f"Ray refused the job {MAX_SUBMIT_REFUSALS} times; last: {reason}")
        else:
            self._requeue(claim, f"Ray refused the job: {reason}")

    def _fail(self, claim: store.Claim, error: str) -> None:
        with self.sessions.begin() as s:
            store.transition(
                s,
                claim.experiment_id,
                Status.failed,
                error,
                self.settings.replica_id,
                expect=[Status.dispatching],
                if_cancelled=_cancelled_before_ray(error),
                error=error,
            )


def _cancelled_before_ray(why: str) -> tuple[str, dict[str, object]]:
    """A claim that did not reach Ray, with a cancel asked meanwhile, ends cancelled, not queued again
    (it would be claimed and run after the user's 202) nor failed."""
    return f"cancelled before it reached Ray ({why})", {}
