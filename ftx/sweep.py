"""Optuna studies as Hydra multiruns: ftx's own integration on current Optuna (>= 4).

The released hydra-optuna-sweeper pins optuna<3, so ftx does the same job here and
keeps the Hydra plugin (hydra_plugins/ftx_optuna_sweeper) a thin adapter:

- the sweeper side (:func:`run_sweep`): parse the search space from Hydra's override
  grammar into Optuna distributions, open (or resume) the study in its storage, ask
  trials in batches of the launcher's parallelism, launch them as Hydra jobs, and
  tell the study how each ended (complete, pruned, failed with its error);
- the trial side (:func:`trial_link`), in whatever process the launcher runs the job:
  reload the trial from the shared storage, report validation loss at every
  validation so the pruner can stop it (across processes: the intermediate values
  of every trial live in the storage), and send heartbeats so that a killed
  worker's trial is failed and re-run (Optuna's RetryHeartbeatStaleTrialCallback).

Optuna does not prune multi-objective studies (``Trial.report`` is single-objective),
so a memory bound on a pruned study is a constraint (``memory_budget_mib``, set with
``Trial.set_constraint``, Optuna 5's replacement for samplers' constraints_func), not
a second objective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from ftx.config import ConfigError, validate
from ftx.faults import Preempted
from ftx.tracking import flatten
from ftx.tracking.report import finite_number
from ftx.train import RunPruned

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
STOP_FILE = ".stop"  # written when the sweep is signalled; its trials stop at their next batch
BEST_FILES = ("best.txt", "best.yaml")
# Trial-side overrides the sweeper adds to each job; not part of a re-run command.
_TRIAL_KEYS = ("sweep_trial.number", "sweep_trial.trial_id")

# ------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    """Optuna distributions by config key, and the fixed overrides every trial gets."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


def search_space(params: DictConfig, arguments: Sequence[str] = ()) -> SearchSpace:
    """``hydra.sweeper.params`` plus the command line's overrides (a sweep there, e.g.
    ``method=lora,qlora`` or ``method.r='choice(4,8)'``, joins the space; a plain value
    is fixed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    # Keys set from the command line (hydra.sweeper.params.method.r=...) arrive nested.
    flat = flatten(OmegaConf.to_container(params))
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in flat.items()])
    overrides += parser.parse_overrides(list(arguments))
    # Later wins: a command-line value for a key of the spec fixes it, a command-line
    # sweep replaces its range.
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = distribution_of(override)
        else:
            fixed[key] = override.input_line
    return SearchSpace(distributions, list(fixed.values()))


def distribution_of(override: Any) -> BaseDistribution:
    """One sweep override → an Optuna distribution, after hydra-optuna-sweeper's
    mapping (plugins/hydra_optuna_sweeper/_impl.py) but with range's end exclusive,
    as Hydra defines it:

    choice(a, b) and a,b → categorical; range(1, 9, 2) → int (float if any bound is);
    interval(lo, hi) → float, int(interval(...)) → int; tag(log, ...) → log scale.
    """
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep) or isinstance(value, RangeSweep) and value.shuffle:
        return CategoricalDistribution(list(override.sweep_iterator()))
    log_scale = "log" in value.tags
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{key}: {override.input_line} is empty.")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step, log=log_scale and value.step == 1)
        return FloatDistribution(values[0], value.start + value.step * (len(values) - 1), step=value.step)
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ConfigError(f"{key}: {override.input_line} is not a sweep Optuna can sample (choice, range, interval).")


def override_of(key: str, value: Any) -> str:
    """``key=value`` in Hydra's grammar (strings quoted when they need it)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str) and not re.fullmatch(r"[\w.\-/:+@]+", value):
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        text = str(value)
    return f"{key}={text}"


# ------------------------------------------------------------------- study & storage


def storage_url(settings: DictConfig, sweep_dir: str | Path) -> str:
    """The storage the sweeper and every trial share: the configured URL, else an
    SQLite file in the sweep directory (absolute: trials may run elsewhere)."""
    if settings.storage:
        return settings.storage
    return f"sqlite:///{(Path(sweep_dir) / STORAGE_FILE).resolve()}"


def make_storage(settings: DictConfig, url: str, retry: bool = False) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats (``retry``: failing stale trials re-runs them), or a
    journal file for ``journal:PATH`` (no heartbeat: a killed trial stays running)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Parallel trials write intermediate values and heartbeats while the sweeper
        # asks and tells: wait for SQLite's lock instead of failing after 5 s.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry) if retry else None
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period,
        heartbeat_stale_trial_callback=callback,
    )


def check_settings(settings: DictConfig, arguments: Sequence[str] = ()) -> SearchSpace:
    """Everything about a sweep spec that can be wrong, found before any trial runs;
    returns the search space of the spec and the command line's ``arguments``."""
    objectives, directions = list(settings.objectives), list(settings.directions)
    if not objectives or len(objectives) != len(directions):
        raise ConfigError(
            f"hydra.sweeper.objectives={objectives} and hydra.sweeper.directions={directions}: "
            "give one direction (maximize or minimize) per objective."
        )
    if set(directions) - {"maximize", "minimize"}:
        raise ConfigError(f"hydra.sweeper.directions={directions}: each must be maximize or minimize.")
    if len(objectives) > 1 and settings.pruner is not None:
        raise ConfigError(
            "Optuna does not prune multi-objective studies (Trial.report takes one value). "
            "Drop hydra.sweeper.pruner, or optimize one objective and bound memory with "
            "hydra.sweeper.memory_budget_mib."
        )
    if settings.n_trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={settings.n_trials} must be >= 1.")
    space = search_space(settings.params, arguments)
    if not space.distributions:
        raise ConfigError("Nothing to search: give hydra.sweeper.params, or a sweep such as 'method.r=choice(4,16)'.")
    make_sampler(settings, space)
    make_pruner(settings)
    return space


def make_sampler(settings: DictConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    from hydra.utils import get_class, instantiate

    kwargs: dict[str, Any] = {}
    sampler_class = get_class(settings.sampler._target_)
    if issubclass(sampler_class, optuna.samplers.GridSampler) and "search_space" not in settings.sampler:
        not_discrete = [k for k, d in space.distributions.items() if not isinstance(d, CategoricalDistribution)]
        if not_discrete:
            raise ConfigError(f"GridSampler needs choice(...) for every parameter; not for: {', '.join(not_discrete)}.")
        kwargs["search_space"] = {k: list(d.choices) for k, d in space.distributions.items()}
    try:
        return instantiate(settings.sampler, **kwargs)
    except Exception as error:  # Hydra wraps the TypeError of a wrong argument
        raise ConfigError(f"hydra.sweeper.sampler: {error}") from None


def make_pruner(settings: DictConfig) -> optuna.pruners.BasePruner:
    from hydra.utils import instantiate

    return optuna.pruners.NopPruner() if settings.pruner is None else instantiate(settings.pruner)


def shown_url(url: str) -> str:
    """A storage URL as logs and errors show it: the password hidden."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL: show its scheme only
        return url.split("://", 1)[0] + "://…"


def open_study(settings: DictConfig, sweep_dir: str | Path, space: SearchSpace) -> optuna.Study:
    """Create the study, or load it when it exists: a re-run resumes it, provided its
    search space and objectives are those it was created with."""
    import sqlalchemy.exc

    url = storage_url(settings, sweep_dir)
    if url.startswith(("sqlite:", "journal:")):  # a file (the default: in the sweep directory)
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    try:
        with _known_optuna_warnings_off():
            storage = make_storage(settings, url, retry=True)
        stored = _stored_settings(storage, settings.study_name)
        if stored is not None:
            _check_same_settings(stored, _settings_record(settings, space), settings.study_name)
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=make_sampler(settings, space),
            pruner=make_pruner(settings),
            directions=list(settings.directions),
            load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ConfigError(
            f"hydra.sweeper.storage={shown_url(url)}: cannot open the study's database ({reason}). Start the "
            "database, or fix the URL (driver, user, host, port, database name); keep its password out of configs "
            "with hydra.sweeper.storage='${oc.env:FTX_SWEEP_STORAGE}'."
        ) from None
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, _settings_record(settings, space))
    for params in settings.enqueue:
        study.enqueue_trial(OmegaConf.to_container(params), skip_if_exists=True)
    return study


SETTINGS_ATTR = "ftx.settings"
"""The study's user attribute holding what a re-run must match: space, objectives, directions."""


def _settings_record(settings: DictConfig, space: SearchSpace) -> dict[str, Any]:
    from optuna.distributions import distribution_to_json

    return {
        "params": {name: json.loads(distribution_to_json(d)) for name, d in sorted(space.distributions.items())},
        "objectives": list(settings.objectives),
        "directions": list(settings.directions),
    }


def _stored_settings(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, Any] | None:
    """What the stored study was created with (None: no such study yet, or one that
    predates the record: it gets one now)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(SETTINGS_ATTR)


def _check_same_settings(stored: dict[str, Any], current: dict[str, Any], study_name: str) -> None:
    differences = []
    for key in ("objectives", "directions"):
        if stored[key] != current[key]:
            differences.append(f"hydra.sweeper.{key} was {stored[key]}, now {current[key]}")
    for name in sorted(stored["params"].keys() | current["params"].keys()):
        was, now = stored["params"].get(name), current["params"].get(name)
        if was != now:
            differences.append(f"{name}: was {_shown_distribution(was)}, now {_shown_distribution(now)}")
    if differences:
        raise ConfigError(
            f"study {study_name} was created with other settings: {'; '.join(differences)}. Its trials would not "
            "compare with new ones: run with the stored settings to resume it, or start another study "
            "(hydra.sweeper.study_name=NEW, or another storage)."
        )


def _shown_distribution(distribution: dict[str, Any] | None) -> str:
    if distribution is None:
        return "not searched"
    return f"{distribution['name']}({', '.join(f'{k}={v}' for k, v in distribution['attributes'].items())})"


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward n_trials: ended, and not superseded by a retry."""
    trials = study.get_trials(deepcopy=False)
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    retried |= {t.user_attrs.get("retry_of") for t in trials}  # retries after a launcher failure
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in done and t.number not in retried for t in trials)


# ------------------------------------------------------------------------- sweeper


Launch = Callable[[list[list[str]], int], Sequence[Any]]


def run_sweep(settings: DictConfig, config: DictConfig, arguments: Sequence[str], launch: Launch) -> optuna.Study:
    """Run the study to ``n_trials`` finished trials; ``launch(overrides, first_job_num)``
    is the Hydra launcher's and returns a JobReturn per job."""
    with _known_optuna_warnings_off():
        return _run_sweep(settings, config, arguments, launch)


@contextlib.contextmanager
def _known_optuna_warnings_off() -> Iterator[None]:
    """Heartbeats and their retry callback are marked experimental (since Optuna 2.8),
    and Optuna warns that heartbeats are meant for optimize(): ask-and-tell with a
    heartbeat thread per trial is what this module does on purpose. Once per trial
    these would bury the log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _run_sweep(settings: DictConfig, config: DictConfig, arguments: Sequence[str], launch: Launch) -> optuna.Study:
    from ftx.faults import stop_on_signals

    sweep_dir = Path(config.hydra.sweep.dir)
    space = check_settings(settings, arguments)
    # What every trial shares is checked once, before any trial: a wrong value (say
    # trainer.strategy=ddp, which would re-run the sweep in every rank) stops the
    # sweep instead of failing each trial.
    validate(config)
    study = open_study(settings, sweep_dir, space)  # a database that does not answer: nothing written
    sweep_dir.mkdir(parents=True, exist_ok=True)
    stop_file = sweep_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # an earlier stop's request: this run resumes what it stopped
    recorded: list[str] = []
    with stop_on_signals(stop_file, write=True) as stop, _database_lost(settings, sweep_dir, recorded):
        _trial_loop(study, settings, space, config, launch, stop, recorded)
        stopped_by = stop.signal
    write_best(study, sweep_dir, config)
    if stopped_by is not None:
        _stopped(study, settings, stopped_by)
    return study


def _trial_loop(
    study, settings: DictConfig, space: SearchSpace, config: DictConfig, launch: Launch, stop, recorded: list[str]
) -> None:
    """Ask, launch and tell in batches of the launcher's parallelism until
    ``n_trials`` trials have finished or a signal asks the sweep to stop;
    ``recorded`` gathers what this run told the study, one line per trial."""
    sweep_dir = Path(config.hydra.sweep.dir)
    batch_size = settings.n_jobs or launcher_parallelism(config.hydra.launcher)
    progress = Progress(study, settings.n_trials, batch_size, lambda: planned_seconds(config))
    log.info(
        "study %s in %s: %d of %d trials done; %d to run, %d at a time%s",
        settings.study_name,
        shown_url(storage_url(settings, sweep_dir)),
        finished_trials(study),
        settings.n_trials,
        progress.to_go(),
        batch_size,
        progress.left_text(),
    )
    while stop.requested() is None:
        _pause_orphans_that_stopped(study, sweep_dir)
        _fail_stale_trials(study, sweep_dir)  # a killed worker's trials: failed, then retried
        to_go = settings.n_trials - finished_trials(study)
        if to_go <= 0:
            break
        trials = [study.ask(space.distributions) for _ in range(min(batch_size, to_go))]
        jobs = [[*space.fixed, *trial_overrides(trial)] for trial in trials]
        for trial in trials:
            trial.set_user_attr("overrides", [*space.fixed, *params_overrides(trial.params)])
        try:
            returns = _launch_numbered(launch, trials, jobs)
        except Exception as error:
            # The launcher itself failed: a worker was killed (joblib's
            # TerminatedWorkerError, a preempted SLURM job) or a job could not be
            # composed. Its trials failed; re-run each with the same parameters.
            log.error("launcher failed on trials %s: %s: %s", [t.number for t in trials], type(error).__name__, error)
            for trial in trials:
                _fail_and_retry(study, trial, f"launcher: {type(error).__name__}: {error}", settings.max_retry)
            continue
        except BaseException:  # an interrupted sweep: close its trials rather than leave them running
            for trial in trials:
                _tell(study, trial, state=TrialState.FAIL)
            raise
        progress.batch_done(trials)
        for trial, job in zip(trials, returns, strict=True):
            tell(study, trial, job, settings)
            done = study.trials[trial.number]
            recorded.append(f"trial {trial.number} {done.state.name.lower()}")
            progress.trial_done(done)


@contextlib.contextmanager
def _database_lost(settings: DictConfig, sweep_dir: Path, recorded: list[str]) -> Iterator[None]:
    """The study's database stopped answering in the middle of the sweep: stop with
    what was recorded and where the rest is, instead of a traceback. The trials that
    were running have ended by then (a run that could not report to the pruner
    failed; its record, like every run's, is in its metrics.json); a trial left
    RUNNING in the study is failed by its stale heartbeat and re-run with the same
    parameters when the same command runs again."""
    import sqlalchemy.exc

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        cause = getattr(error, "__cause__", None) or error
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        told = ", ".join(recorded) if recorded else "no trial"
        raise ConfigError(
            f"hydra.sweeper.storage={shown_url(storage_url(settings, sweep_dir))}: the study's database stopped "
            f"answering ({reason}). This run recorded {told} before it; each run's result is in its directory "
            f"under {sweep_dir} (metrics.json). When the database answers again, run the same command: it "
            "resumes the study (a trial it could not record is re-run with its parameters)."
        ) from None


class Progress:
    """How far a sweep is and how long the rest will take: from this run's finished
    trials once there are any (elapsed / finished × to go: parallel workers
    included), else from the study's earlier trials (``seconds`` each took, run
    ``batch`` at a time), else the planner's training time of the sweep's base config."""

    def __init__(self, study: optuna.Study, n_trials: int, batch: int, planned: Callable[[], float | None]) -> None:
        self.study, self.n_trials, self.batch, self.planned = study, n_trials, batch, planned
        self.started, self.finished_here = time.monotonic(), 0
        self.batch_started = self.started

    def to_go(self) -> int:
        return max(self.n_trials - finished_trials(self.study), 0)

    def seconds_left(self) -> tuple[float, str] | None:
        to_go = self.to_go()
        if to_go == 0:
            return 0.0, "done"
        if self.finished_here:
            return (time.monotonic() - self.started) / self.finished_here * to_go, "measured"
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        earlier = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
        if earlier:
            return sum(earlier) / len(earlier) * math.ceil(to_go / self.batch), "the study's earlier trials"
        planned = self.planned()
        if planned is None:
            return None
        return planned * math.ceil(to_go / self.batch), "planner: training only, scoring not included"

    def left_text(self) -> str:
        left = self.seconds_left()
        if left is None or left[1] == "done":
            return ""
        from ftx.memory.plan import human_seconds

        return f"; about {human_seconds(left[0])} left ({left[1]})"

    def batch_done(self, trials: Sequence[optuna.Trial]) -> None:
        seconds = time.monotonic() - self.batch_started
        for trial in trials:  # launched together: each took the batch's wall time
            trial.set_user_attr("seconds", seconds)
        self.batch_started = time.monotonic()

    def trial_done(self, trial: FrozenTrial) -> None:
        if not trial.state.is_finished():  # stopped (waiting to resume): said by _pause
            return
        self.finished_here += 1
        log.info(
            "trial %d/%d done (#%d, %s)%s",
            finished_trials(self.study),
            self.n_trials,
            trial.number,
            trial.state.name.lower(),
            self.left_text(),
        )


def planned_seconds(config: DictConfig) -> float | None:
    """The planner's training time of one run of ``config`` on its device, or None
    when it cannot plan it (a base it cannot read)."""
    from ftx.memory.plan import plan

    try:
        return plan(config).device_train_s
    except Exception as error:  # the estimate is a courtesy: never stop a sweep over it
        log.info("no time estimate from the planner: %s: %s", type(error).__name__, error)
        return None


def _stopped(study: optuna.Study, settings: DictConfig, signal_name: str) -> None:
    """End a sweep a signal stopped: say what was saved and how to resume, and exit
    128 + the signal's number (the shell's convention for a process a signal ended)."""
    import shlex
    import signal
    import sys

    waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if "stopped" in t.user_attrs]
    lines = [
        f"sweep {settings.study_name} stopped on {signal_name}: "
        f"{finished_trials(study)} of {settings.n_trials} trials finished"
    ]
    for trial in waiting:
        lines.append(f"  trial {trial.number} paused, resumes first: {trial.user_attrs['stopped']}")
    lines.append("resume: " + shlex.join(["ftx", "train", *sys.argv[1:]]))
    text = "\n".join(lines)
    log.warning("%s", text)
    print(text, file=sys.stderr)
    raise SystemExit(128 + getattr(signal, signal_name, signal.SIGTERM).value)


def launcher_parallelism(launcher: DictConfig) -> int:
    """Jobs the launcher runs at once: joblib's n_jobs (-1: every CPU), submitit's
    array_parallelism, else 1 (Hydra's basic launcher runs one job at a time)."""
    for key in ("n_jobs", "array_parallelism"):
        value = OmegaConf.select(launcher, key)
        if isinstance(value, int):
            return (os.cpu_count() or 1) if value < 0 else max(value, 1)
    return 1


def _launch_numbered(launch: Launch, trials: list[optuna.Trial], jobs: list[list[str]]) -> list[Any]:
    """Launch so that each job's number (hydra.job.num, its directory's prefix) is its
    trial's number: in one batch when they are consecutive, else one by one (another
    sweeper on the same study took the numbers between)."""
    numbers = [t.number for t in trials]
    if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return list(launch(jobs, numbers[0]))
    return [launch([job], number)[0] for job, number in zip(jobs, numbers, strict=True)]


def params_overrides(params: dict[str, Any]) -> list[str]:
    return [override_of(key, value) for key, value in params.items()]


def trial_overrides(trial: optuna.Trial) -> list[str]:
    """A trial's parameters, and where the job finds the trial (SweepTrialConfig)."""
    ids = (trial.number, trial._trial_id)  # the storage id: Optuna has no public accessor on Trial
    return [*params_overrides(trial.params), *(f"{k}={v}" for k, v in zip(_TRIAL_KEYS, ids, strict=True))]


def tell(study: optuna.Study, trial: optuna.Trial, job: Any, settings: DictConfig) -> None:
    """Record how a job ended: its objective values, pruned, or failed with its error."""
    from hydra.core.utils import JobStatus

    if job.hydra_cfg is not None:  # None when the job ended without a result (ftx_slurm_launcher)
        trial.set_user_attr("run_dir", str(job.hydra_cfg.hydra.runtime.output_dir))
    if job.status != JobStatus.COMPLETED:
        error = job._return_value  # JobReturn.return_value would re-raise it
        if isinstance(error, Preempted):
            _pause(study, trial, error)
            return
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        _tell(study, trial, state=TrialState.FAIL)
        return
    record = flatten(job.return_value)
    peak = record.get("memory.peak_bytes")
    if isinstance(peak, int | float):
        trial.set_user_attr("memory.peak_bytes", peak)
        if settings.memory_budget_mib is not None:
            # Feasible when <= 0: samplers that model constraints (TPE, NSGA-II, GP) steer
            # away from infeasible regions, and best_trial only picks feasible trials.
            trial.set_constraint("memory_excess_bytes", peak - settings.memory_budget_mib * 2**20)
    if record["status"] == "pruned":
        _tell(study, trial, state=TrialState.PRUNED)
        log.info("trial %d pruned at step %s", trial.number, record.get("train.steps"))
        return
    values = [record.get(key) for key in settings.objectives]
    missing = [k for k, v in zip(settings.objectives, values, strict=True) if not finite_number(v)]
    if missing:
        trial.set_user_attr("error", f"no finite {', '.join(missing)} in the run record")
        log.warning("trial %d failed: no finite %s in its record", trial.number, ", ".join(missing))
        _tell(study, trial, state=TrialState.FAIL)
        return
    _tell(study, trial, values)
    log.info("trial %d: %s", trial.number, _values_text(settings.objectives, values))


def _pause(study: optuna.Study, trial: optuna.Trial, error: Preempted) -> None:
    """A trial a signal stopped after saving its checkpoint is not a failure: back to
    WAITING, with its parameters and number, so that the next ``study.ask`` (this
    sweep's, or the same command's again) runs it first and its run resumes from the
    checkpoint in the same run directory."""
    trial.set_user_attr("stopped", str(error))
    trial.set_user_attr("stops", trial.user_attrs.get("stops", 0) + 1)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
    log.warning("trial %d stopped: %s", trial.number, error)


def _pause_orphans_that_stopped(study: optuna.Study, sweep_dir: Path) -> None:
    """Trials left RUNNING by a driver that died before it could record them (a
    ``scancel`` whose KillWait ran out) but whose run says it stopped with a
    checkpoint: paused like the trials a live driver records, not failed."""
    import json
    from datetime import datetime

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        for record_file in sweep_dir.glob(f"{trial.number}-*/metrics.json"):
            # written by this attempt (after it started), not left by an earlier stop
            written = datetime.fromtimestamp(record_file.stat().st_mtime)
            record = json.loads(record_file.read_text())
            if record.get("status") == "stopped" and trial.datetime_start and written >= trial.datetime_start:
                study._storage.set_trial_user_attr(trial._trial_id, "stopped", record.get("error", "stopped"))
                study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
                log.warning("trial %d was stopped (%s); it resumes first", trial.number, record.get("error"))


def _fail_stale_trials(study: optuna.Study, sweep_dir: Path) -> None:
    """Trials whose heartbeat stopped (their worker, or the whole sweep, was killed)
    fail, and Optuna's retry callback enqueues their parameters again. A killed run
    wrote no record: it gets one saying so, so the report lists it beside its retry."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return
    optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.number not in running:
            continue
        log.warning("trial %d failed: no heartbeat for longer than the grace period (killed?)", trial.number)
        for run_dir in sweep_dir.glob(f"{trial.number}-*"):
            if (run_dir / "metrics.json").is_file() or not (run_dir / ".hydra" / "config.yaml").is_file():
                continue
            from ftx.tracking import run_record, write_metrics

            try:
                record = run_record(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
            except Exception:  # a config this version cannot resolve: the status still says it
                record = {}
            error = "killed: its heartbeat stopped before the run ended; the sweep re-runs its parameters"
            write_metrics(run_dir, record | {"status": "failed", "error": error})


def _fail_and_retry(study: optuna.Study, trial: optuna.Trial, error: str, max_retry: int) -> None:
    """Fail a trial whose job was lost, and enqueue its parameters again unless they
    were already retried ``max_retry`` times (as Optuna's heartbeat retry does)."""
    trial.set_user_attr("error", error)
    _tell(study, trial, state=TrialState.FAIL)
    retries = trial.user_attrs.get("retries", 0)  # the Trial object's attrs: set when it was enqueued
    if retries < max_retry:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retries": retries + 1})


def _tell(study: optuna.Study, trial: optuna.Trial, values: Sequence[float] | None = None, **kwargs: Any) -> None:
    # GridSampler.after_trial calls study.stop() once the grid is used up, which Optuna
    # allows only inside optimize(): with ask-and-tell it raises before the trial's state
    # is stored. Let it set its flag; this loop stops on n_trials anyway.
    study._thread_local.in_optimize_loop = True
    try:
        study.tell(trial, values, **kwargs)
    finally:
        study._thread_local.in_optimize_loop = False
        study._stop_flag = False


def _values_text(keys: Sequence[str], values: Sequence[float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, values, strict=True))


# ------------------------------------------------------------------- plan a sweep


def plan_sweep(name: str, arguments: Sequence[str]) -> str:
    """``ftx sweep NAME --plan``: the trials a sweep will run, the planner's memory
    and training time per trial at the corners of its space (every choice, both ends
    of an int range, the low end of a float one) and the total, without training."""
    import itertools

    from ftx.config import compose_config
    from ftx.memory.plan import human_bytes, human_seconds, plan

    hydra_args = [a for a in arguments if a.startswith(("hydra.", "hydra/"))]
    cfg = compose_config([f"sweep={name}", *hydra_args], with_hydra=True)
    settings = cfg.hydra.sweeper
    space = check_settings(settings, [a for a in arguments if a not in hydra_args])
    batch = settings.n_jobs or launcher_parallelism(cfg.hydra.launcher)
    corners = {key: _corners(d) for key, d in space.distributions.items()}
    combos = list(itertools.islice(itertools.product(*corners.values()), 48))
    done = _finished_in_storage(settings, cfg.hydra.sweep.dir)
    to_go = max(settings.n_trials - done, 0)
    keys = list(corners)
    rows, seconds = [], []
    for values in combos:
        params = dict(zip(keys, values, strict=True))
        trial_cfg = compose_config([f"sweep={name}", *hydra_args, *space.fixed, *params_overrides(params)])
        validate(trial_cfg)
        planned = plan(trial_cfg)
        seconds.append(planned.device_train_s)
        rows.append([*(str(v) for v in values), human_bytes(planned.peak_bytes), human_seconds(planned.device_train_s)])
    header = [*keys, "peak memory", "training"]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    table = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    mean = sum(seconds) / len(seconds)
    device = plan(compose_config([f"sweep={name}", *hydra_args, *space.fixed])).device
    return "\n".join(
        [
            f"sweep {name}: {settings.n_trials} trials, {done} finished, {to_go} to run, "
            f"{batch} at a time, on {device}",
            "planned per trial at the corners of the space (training only; scoring adds):",
            *("  " + line for line in table),
            f"total: about {human_seconds(mean * math.ceil(to_go / batch))} "
            f"({to_go} trials × {human_seconds(mean)} mean, {batch} at a time)",
        ]
    )


def _corners(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return sorted({distribution.low, distribution.high})
    return [distribution.low]  # a float (a learning rate): no effect on memory or time


def _finished_in_storage(settings: DictConfig, sweep_dir: str) -> int:
    """Finished trials of the study already in its storage (0 when it has none yet);
    never creates the storage."""
    url = storage_url(settings, sweep_dir)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return 0
    try:
        with _known_optuna_warnings_off():
            study = optuna.load_study(study_name=settings.study_name, storage=make_storage(settings, url))
    except KeyError:  # no such study yet
        return 0
    return finished_trials(study)


# ---------------------------------------------------------------------- best trials


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial of one objective (feasible under the memory budget), or the Pareto front."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # nothing completed, or nothing feasible
        return []


def rerun_command(trial: FrozenTrial, config: DictConfig) -> str:
    """The ``ftx train`` command line that re-runs a trial on its own."""
    sweep = OmegaConf.select(config, "hydra.runtime.choices.sweep")
    selection = [] if sweep in (None, "null") else [f"sweep={sweep}"]
    return " ".join(["ftx train", *selection, *trial.user_attrs["overrides"]])


def write_best(study: optuna.Study, sweep_dir: Path, config: DictConfig) -> list[FrozenTrial]:
    """Print the best trial(s) and write them to best.txt (commands) and best.yaml."""
    best = best_trials(study)
    keys = list(config.hydra.sweeper.objectives)
    lines, entries = [], []
    for trial in best:
        command = rerun_command(trial, config)
        lines += [f"# trial {trial.number}: {_values_text(keys, trial.values)}", command]
        entries.append(
            {
                "number": trial.number,
                "values": dict(zip(keys, trial.values, strict=True)),
                "params": trial.params,
                "run_dir": trial.user_attrs.get("run_dir"),
                "command": command,
            }
        )
    title = "Pareto front" if len(keys) > 1 else "best trial"
    text = "\n".join(lines) if lines else "# no completed trial"
    (sweep_dir / "best.txt").write_text(text + "\n")
    OmegaConf.save(OmegaConf.create({"study": study.study_name, "best": entries}), sweep_dir / "best.yaml")
    log.info("%s of study %s (%s):\n%s", title, study.study_name, sweep_dir / "best.txt", text)
    return best


# ---------------------------------------------------------------------- trial side


@contextlib.contextmanager
def trial_link(cfg: DictConfig, sweeper: DictConfig, sweep_dir: str) -> Iterator[list]:
    """Inside a trial's job: yield the Lightning callbacks that report to the study
    (pruning), and beat the trial's heartbeat while the run lasts."""
    url = storage_url(sweeper, sweep_dir)
    with _known_optuna_warnings_off():
        storage = make_storage(sweeper, url)
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=make_pruner(sweeper))
    trial = optuna.trial.Trial(study, cfg.sweep_trial.trial_id)
    callbacks = []
    if sweeper.pruner is not None:
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        callbacks.append(PruningCallback(trial, sweeper.prune_on, sign))
    from ftx.faults import stop_on_signals

    # A signal to this process, or the sweep's stop file, stops the trial at its next
    # batch with a checkpoint (ftx.faults.Preemption), wherever the trial runs.
    with (
        _heartbeat(storage, cfg.sweep_trial.trial_id, sweeper.heartbeat_interval),
        stop_on_signals(Path(sweep_dir) / STOP_FILE),
    ):
        yield callbacks


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial_id: int, interval: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``interval`` seconds from a daemon thread, as
    Optuna's optimize() does for its own trials (ask-and-tell trials get none)."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        warned = False
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # the database went away: the run goes on; say it once
                if not warned:
                    why = type(error).__name__
                    log.warning("heartbeat of trial %d not recorded (%s): the database is not answering", trial_id, why)
                    warned = True
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class PruningCallback(L.Callback):
    """Report the validation metric to the trial after every validation; stop the run
    (RunPruned → metrics.json status ``pruned``) when the study's pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, sign: float) -> None:
        self.trial, self.metric, self.sign = trial, metric, sign

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        step = trainer.global_step
        self.trial.report(self.sign * float(value), step)
        if self.trial.should_prune():
            peak = trainer.callback_metrics.get("memory.peak_bytes")
            raise RunPruned(step, float(value), None if peak is None else float(peak))
