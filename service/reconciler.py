"""The reconciler: follows Ray job status and the run folder into the database (issue item 6).

Each pass looks at every dispatching or running experiment: its Ray job's status, and its run
folder (metrics.jsonl, checkpoints/, trials.json, result.json). It holds no state of its own, so
a restarted service simply carries on, and every write is idempotent or a compare-and-set, so
several replicas may reconcile at once. A running job's logs are copied to
`{run}/logs/{submission_id}.log` every `log_mirror_interval` seconds, and once more before the final
state is written, so they outlive the head.

When Ray stays unreachable for `ray_lost_after` seconds, the experiments it was running are failed
as lost, naming the cluster (their metrics read from the run folder first); a replica that sees the
cluster again stops those jobs if they are still there, so that a retry never runs beside them.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cdsp_core import runs
from cdsp_core.spec import ExperimentSpec, SpecError, validate_spec
from service import runfolder, store
from service.models import Experiment, utcnow
from service.ray_jobs import JobInfo, JobNotFound, RayError, RayJobs, RayUnavailable
from service.settings import Settings
from service.states import FINAL, Status

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], ray: RayJobs):
        self.settings = settings
        self.sessions = sessions
        self.ray = ray
        self.replica = settings.replica_id
        self.unreachable_since: float | None = None  # monotonic time of the first failed ping of an outage
        self._lost: dict[str, str] = {}  # experiment id -> submission id, failed as lost in this outage
        self._mirrored: dict[str, float] = {}  # submission id -> monotonic time of the last log copy
        self._folder_errors: dict[str, list[str]] = {}  # experiment id -> run-folder problems last logged

    def reconcile_once(self) -> int:
        """One pass over the active experiments; stops early when Ray is unreachable.

        Returns how many are still dispatching (submitted, not yet running), so that the loop can
        look again sooner: that wait is most of the submit-to-running latency.
        """
        with self.sessions() as s:
            active = store.active(s)
        for exp in active:
            try:
                self._reconcile(exp)
            except RayUnavailable as exc:
                log.warning("reconciler: %s", exc)
                return 0
            except RayError as exc:  # Ray answered with an error about this job: try again next pass
                log.warning("reconciler: %s: %s", exp.id, exc)
            except Exception:  # this experiment's trouble (a run folder, a row) must not hold up the others
                log.exception("reconciler: could not follow %s; trying again next pass", exp.id)
        with self.sessions() as s:
            return sum(e.status == Status.dispatching for e in store.active(s))

    def _reconcile(self, exp: Experiment) -> None:
        sid = exp.submission_id
        if sid is None:  # every claim sets one (store.claim); nothing to follow without it
            log.error("reconciler: %s is %s without a Ray submission id", exp.id, exp.status)
            return
        try:
            job = self.ray.info(sid)
        except JobNotFound:
            self._missing(exp)
            return
        spec = self._spec(exp)
        if spec is None:
            return
        if exp.cancel_requested and job.status in ("PENDING", "RUNNING"):
            self._stop(sid)
        if job.status in ("PENDING", "RUNNING"):
            if exp.submitted_at is None:  # submitted by a replica that died before recording it
                self._update(exp, submitted_at=utcnow())
            if job.status == "RUNNING" and exp.status == Status.dispatching:
                self._move(exp, Status.running, "Ray job running", started_at=_ts(job.start_time))
            if job.status == "RUNNING":
                self._mirror_logs(exp.run_dir, sid)
            self.ingest(exp, spec)
            return
        self._finish(exp, spec, job)

    def _spec(self, exp: Experiment) -> ExperimentSpec | None:
        try:
            return validate_spec(exp.spec, stored=True)
        except SpecError as exc:
            # Failed here, the experiment is no longer watched: its Ray job (if any) is stopped with it.
            error = f"the stored spec is no longer valid: {exc}"
            if self._move(exp, Status.failed, "invalid stored spec", error=error) and exp.submission_id:
                self._stop(exp.submission_id)
            return None

    def _missing(self, exp: Experiment) -> None:
        """Ray does not know the job: never submitted (requeue or cancel), or lost with a Ray head."""
        if exp.submitted_at is None:
            if not store.stale_claim(exp, utcnow(), self.settings.dispatch_grace):
                return  # a dispatcher may be submitting it right now
            unclaimed = {"claimed_by": None, "claimed_at": None, "submission_id": None}
            self._move(
                exp,
                Status.queued,
                "claim never reached Ray; requeued",
                export=False,
                if_cancelled=("cancelled before it reached Ray", unclaimed),
                **unclaimed,
            )
            return
        error = (
            f"Ray job {exp.submission_id} is no longer known to the cluster at {self.ray.address} "
            "(was the Ray head restarted?); retry resumes from the latest checkpoint"
        )
        self._move(exp, Status.failed, "Ray job lost", if_cancelled=("Ray job lost", {"error": error}), error=error)

    def _finish(self, exp: Experiment, spec: ExperimentSpec, job: JobInfo) -> None:
        """Copy the logs, read the run folder a last time, then record the final state."""
        sid = exp.submission_id or exp.id
        started = exp.status == Status.dispatching and job.start_time
        if started and self._move(exp, Status.running, "Ray job running", started_at=_ts(job.start_time)):
            exp.status = Status.running  # it ran between two passes: record that it did
        logs = self._archive_logs(exp.run_dir, sid)
        snap = self.ingest(exp, spec)
        when = _ts(job.end_time) or utcnow()
        if job.status == "SUCCEEDED":
            if snap.result is None:
                self._move(
                    exp,
                    Status.failed,
                    "no result.json",
                    finished_at=when,
                    error="the job exited 0 but wrote no usable result.json to the run folder"
                    + "".join(f"; {problem}" for problem in snap.errors),
                )
                return
            self._move(
                exp,
                Status.succeeded,
                "Ray job succeeded",
                finished_at=when,
                result=snap.result,
                epochs_done=runfolder.total_epochs(spec),
            )
        else:
            error = runfolder.error_line(logs) or _summary(job)
            stopped = job.status == "STOPPED"  # by our cancel, or else from outside the service
            if stopped:
                error = f"the Ray job was stopped outside the service: {error}"
            self._move(
                exp,
                Status.failed,
                f"Ray job {job.status.lower()}",
                if_cancelled=("cancelled", {"finished_at": when, "error": None}) if stopped else None,
                finished_at=when,
                error=error,
            )

    def _export(self, experiment_id: str) -> None:
        """Mirror an ended experiment to MLflow when configured, in a thread (an upload must not hold up
        the loop; a restarted service does not mirror an attempt twice)."""
        uri = self.settings.mlflow_tracking_uri
        if not uri:
            return
        import threading

        from service.mlflow_export import mirror_quietly

        with self.sessions() as s:
            exp = store.get(s, experiment_id)
            s.expunge(exp)  # its loaded fields stay readable in the thread
        if exp.status not in FINAL:
            return
        name = self.settings.mlflow_experiment
        threading.Thread(target=mirror_quietly, args=(exp, uri, name), name=f"mlflow-{exp.id}", daemon=True).start()

    # ---- a lost cluster -----------------------------------------------------------------------
    def cluster_unreachable(self, problem: str) -> list[str]:
        """Called on every pass while Ray does not answer; once it has not for `ray_lost_after` seconds,
        fails the experiments submitted to it. Returns the ids failed now."""
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
        waited = now - self.unreachable_since
        if waited < self.settings.ray_lost_after:
            return []
        return self.fail_submitted(f"lost the Ray cluster at {self.ray.address}: {problem}, for {waited:.0f} s")

    def fail_submitted(self, cause: str) -> list[str]:
        """Fail (or, when a cancel was asked, cancel) every experiment submitted to the lost cluster, its
        metrics read from the run folder first; returns their ids."""
        with self.sessions() as s:
            active = [e for e in store.active(s) if e.submitted_at is not None]
        failed = []
        for exp in active:
            spec = self._spec(exp)
            if spec is not None:
                self.ingest(exp, spec)  # the run folder does not depend on Ray: metrics up to the loss
            sid = exp.submission_id or exp.id
            error = (
                f"{cause}; the logs up to then are in logs/{sid}.log; retry resumes from the latest "
                "checkpoint once a cluster answers"
            )
            lost: dict[str, Any] = {"finished_at": utcnow(), "error": error}
            if self._move(exp, Status.failed, "Ray cluster lost", if_cancelled=("Ray cluster lost", lost), **lost):
                self._lost[exp.id] = sid
                failed.append(exp.id)
        return failed

    def cluster_reachable(self) -> None:
        """Ray answers (again): jobs failed as lost that the cluster still runs are stopped."""
        self.unreachable_since = None
        for exp_id, sid in list(self._lost.items()):
            try:
                self.ray.stop(sid)
            except JobNotFound:
                pass
            except (RayError, RayUnavailable) as exc:
                log.warning("could not stop %s of lost experiment %s: %s", sid, exp_id, exc)
                continue
            del self._lost[exp_id]

    def _mirror_logs(self, run_dir: str, sid: str) -> None:
        now = time.monotonic()
        if now - self._mirrored.get(sid, 0.0) >= self.settings.log_mirror_interval:
            self._mirrored[sid] = now
            self._archive_logs(run_dir, sid)

    def _archive_logs(self, run_dir: str, sid: str) -> str:
        try:
            logs = self.ray.logs(sid)
        except (JobNotFound, RayError) as exc:
            log.warning("no logs for %s: %s", sid, exc)
            return ""
        try:
            runs.write_text(runfolder.log_location(run_dir, sid), logs)
        except Exception as exc:  # storage errors must not keep the experiment from finishing
            log.warning("could not copy the logs of %s to %s: %s", sid, run_dir, exc)
        return logs

    def ingest(self, exp: Experiment, spec: ExperimentSpec) -> runfolder.Snapshot:
        """Copy the run folder (metrics lines, progress, checkpoints, trials) into the row; idempotent."""
        snap = runfolder.read(exp.run_dir, spec)
        if snap.errors != self._folder_errors.get(exp.id, []):  # log changes, not every pass
            for problem in snap.errors:
                log.warning("%s: run folder %s: %s", exp.id, exp.run_dir, problem)
            self._folder_errors[exp.id] = snap.errors
        with self.sessions.begin() as s:
            count = store.sync_metric_rows(s, exp.id, snap.rows, exp.metrics_count)
            fields: dict[str, Any] = {
                "metrics_count": count,
                "epochs_done": snap.epochs_done,
                "stage": snap.stage,
                "latest_metrics": snap.latest,
                "checkpoints": snap.checkpoints,
                "trials": snap.trials,
            }
            if runs.TRIALS in snap.unreadable:  # caught mid-write: keep the stored trials, not blank them
                del fields["trials"]
            store.update_fields(s, exp.id, **fields)
        exp.metrics_count = count
        return snap

    def _stop(self, sid: str) -> None:
        try:
            self.ray.stop(sid)
        except (JobNotFound, RayError) as exc:
            log.warning("could not stop %s: %s", sid, exc)

    def _move(
        self,
        exp: Experiment,
        to: Status,
        reason: str,
        export: bool = True,
        if_cancelled: tuple[str, dict[str, Any]] | None = None,
        **values: Any,
    ) -> bool:
        """Record a transition; an experiment that ends here (finished, lost with its job or its cluster)
        is mirrored to MLflow once the move is committed. Experiments that end before reaching Ray
        (`export=False`; cancelled in the queue or refused at dispatch elsewhere) ran nothing and are not
        mirrored. A failure to start the mirror is logged: MLflow never decides an experiment's fate,
        nor stops the caller's work after the move (`fail_submitted` still records the lost job).
        `if_cancelled`: the move instead when a cancel was asked (store.transition).
        """
        with self.sessions.begin() as s:
            moved = store.transition(
                s, exp.id, to, reason, self.replica, expect=[Status(exp.status)], if_cancelled=if_cancelled, **values
            )
        if moved and export and to in FINAL:
            try:
                self._export(exp.id)
            except Exception:
                log.exception("could not start the MLflow mirror of %s", exp.id)
        return moved

    def _update(self, exp: Experiment, **values: object) -> None:
        with self.sessions.begin() as s:
            store.update_fields(s, exp.id, **values)


def _ts(unix: float | None) -> datetime | None:
    return datetime.fromtimestamp(unix, UTC) if unix else None


def _summary(job: JobInfo) -> str:
    """Ray's message without the log tail it appends (the logs are archived separately)."""
    first = job.message.split(", last available logs")[0].strip() if job.message else ""
    return first or f"the Ray job ended {job.status}"
