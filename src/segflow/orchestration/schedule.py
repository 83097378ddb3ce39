"""``segflow schedule``: the Prefect deployment that retrains on a cron schedule (``params.yaml``: ``schedule``);
and the deployment of one architecture's chain that the pipeline flow submits to ``orchestrate.work_pool``.

The deployment runs ``pipelines/retraining.py:segflow_retraining`` in this project folder, on the cron of
``schedule.cron``, never more than ``schedule.concurrency_limit`` runs at once (a run due meanwhile waits, or is
cancelled with ``on_overlap: cancel_new``). Schedules live on a Prefect server (``prefect server start``, or the
one in infra/docker-compose.yml) named by ``PREFECT_API_URL``: the ephemeral server that ``make run`` uses
exists only while a flow runs, so it runs nothing on a schedule.

Who runs the scheduled runs: a worker polling ``schedule.work_pool`` (``prefect worker start --pool NAME``; the
compose stack has one), or, with ``serve=True``, this process, until it is stopped (its schedule is then
paused, as Prefect does for served deployments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from segflow.config import Params, ScheduleParams
from segflow.errors import SegflowError

ENTRYPOINT = "pipelines/retraining.py:segflow_retraining"
WORKER_POOL_TYPE = "process"  # the pool a worker on this machine or in the compose stack polls


@dataclass
class Scheduled:
    deployment: str  # FLOW/DEPLOYMENT, as `prefect deployment run` takes it
    deployment_id: str
    api_url: str


def prefect_api_url() -> str:
    """The Prefect server's API URL, checked to answer; a SegflowError says what to do when it does not."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise SegflowError(
            "segflow schedule: PREFECT_API_URL is not set. Schedules need a Prefect server: start one "
            "(`prefect server start`, or `docker compose up -d` in infra/) and set "
            "PREFECT_API_URL=http://HOST:4200/api (or `prefect config set PREFECT_API_URL=...`)."
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise SegflowError(
            f"segflow schedule: no Prefect server answers at PREFECT_API_URL={url} ({type(problem).__name__}: "
            f"{problem}). Start it (`prefect server start`, or `docker compose up -d` in infra/) or fix the URL."
        )
    return url


def cron_schedule(cfg: ScheduleParams):
    """``schedule.cron`` in ``schedule.timezone`` as Prefect's schedule, checked the way the server checks it."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as exc:
        # Prefect's messages quote the value already.
        problems = "; ".join(f"schedule.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise SegflowError(f"invalid parameters: {problems}.") from None


def retraining_deployment(params: Params, project_dir: Path, *, serve: bool):
    """The deployment of the retraining flow in ``project_dir``: schedule, concurrency limit, work pool."""
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    cfg = params.schedule
    if not (project_dir / ENTRYPOINT.split(":")[0]).is_file():
        raise SegflowError(f"{project_dir}: no {ENTRYPOINT.split(':')[0]}; run segflow schedule in the project folder.")
    # The source is this folder: runs start there (a worker gets a set_working_directory pull step).
    flow = Flow.from_source(source=str(project_dir), entrypoint=ENTRYPOINT)
    return flow.to_deployment(
        name=cfg.deployment,
        schedules=[cron_schedule(cfg)],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=cfg.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy[cfg.on_overlap.upper()]
        ),
        work_pool_name=None if serve else cfg.work_pool,
        description=f"segflow retraining of {project_dir} on cron {cfg.cron!r} ({cfg.timezone})",
    )


def ensure_work_pool(name: str) -> None:
    """The work pool ``name`` on the Prefect server, created as a process pool when missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=WORKER_POOL_TYPE))


def schedule(params: Params, project_dir: Path, *, serve: bool = False) -> Scheduled | None:
    """Create or update the retraining deployment on the Prefect server; with ``serve``, also run it here.

    Serving blocks until the process is stopped (then returns None). Without it, the work pool is created
    (as a process pool) when missing, and a worker must poll it.
    """
    from prefect import serve as serve_deployments

    api_url = prefect_api_url()
    deployment = retraining_deployment(params, project_dir.resolve(), serve=serve)
    if serve:
        serve_deployments(deployment)  # registers (upserts) the deployment, then runs what is due
        return None
    ensure_work_pool(params.schedule.work_pool)
    deployment_id = deployment.apply()
    return Scheduled(f"{deployment.flow_name}/{deployment.name}", str(deployment_id), api_url)


ARCHITECTURE_ENTRYPOINT = "pipelines/architecture.py:segflow_architecture"
ARCHITECTURE_FLOW = "segflow-architecture"
CRASH_DETECTION = "segflow: crash architecture runs without heartbeats"
MISSED_HEARTBEATS = 3  # a run is crashed after this many heartbeat periods without one


def architecture_deployment(project_dir: Path, work_pool: str, heartbeat_seconds: int) -> str:
    """Create or update the deployment of the per-architecture flow on ``work_pool`` (its id), and the
    automation that marks its runs crashed when their heartbeats stop (a killed worker or pod): Prefect's
    zombie-flow detection, so that the pipeline flow can submit the chain again."""
    from prefect import Flow

    ensure_work_pool(work_pool)
    _ensure_crash_detection(heartbeat_seconds)
    flow = Flow.from_source(source=str(project_dir), entrypoint=ARCHITECTURE_ENTRYPOINT)
    deployment = flow.to_deployment(
        name=project_dir.name, work_pool_name=work_pool,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds)}},
        description=f"one architecture's train -> evaluate chain of {project_dir}",
    )
    return str(deployment.apply())


def _ensure_crash_detection(heartbeat_seconds: int) -> None:
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds)
    try:
        existing = Automation.read(name=CRASH_DETECTION)
    except ValueError:
        existing = None
    if existing is not None and existing.trigger.within == within:
        return
    if existing is not None:
        existing.delete()
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=CRASH_DETECTION,
        description=f"{ARCHITECTURE_FLOW} runs that sent no heartbeat for {within.total_seconds():.0f} s",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": ARCHITECTURE_FLOW}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=within,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within.total_seconds():.0f} s: its worker is gone")],
    ).create()
