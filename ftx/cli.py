"""The ``ftx`` command. Imports only Hydra and the config schema at start-up;
each command imports what it needs when it runs."""

from __future__ import annotations

import sys

USAGE = """usage: ftx COMMAND [overrides]

Fine-tuning as a declarative experiment (Hydra configs, Lightning, PEFT).

commands:
  train [overrides]     train one run; -m/--multirun for one run per combination
                        e.g. ftx train method=qlora method.r=32 optim.lr=2e-4
                             ftx train -m method=full,lora,qlora
                             ftx train --cfg job      (print the composed config)
                             ftx train --help         (config groups and options)

  report PATH... [--out DIR]
                        table of runs sorted by quality, Pareto front marked:
                        writes report.md, trials.csv, pareto.png (default: in PATH)

Every value of `ftx train --cfg job` can be overridden as key=value.
"""

COMMANDS = ("train", "report")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ftx: unknown command {command!r}; choose from: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if command == "report":
        report(rest)
        return
    run_hydra(train_job, rest, prog=f"ftx {command}")


def report(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftx report", description="Compare runs: quality against peak memory.")
    parser.add_argument("paths", nargs="+", help="run directories, or sweep/output directories holding them")
    parser.add_argument(
        "--out", help="where report.md, trials.csv and pareto.png go (default: the single PATH, else .)"
    )
    options = parser.parse_args(args)
    from ftx.tracking.report import write_report

    out = options.out or (options.paths[0] if len(options.paths) == 1 else ".")
    try:
        out_dir, table = write_report(options.paths, out)
    except FileNotFoundError as error:
        print(f"ftx report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table)
    print(f"\nwrote {out_dir / 'report.md'}, {out_dir / 'trials.csv'}, {out_dir / 'pareto.png'}")


def run_hydra(task, args: list[str], prog: str) -> None:
    """Run ``task`` as a Hydra app over ftx's config tree with ``args`` as overrides."""
    import hydra

    from ftx.config import config_dir, register_configs, register_resolvers

    register_configs()
    register_resolvers()
    sys.argv = [prog, *args]
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)()


def train_job(cfg) -> float | None:
    """Hydra task for ``ftx train``; returns eval loss for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ftx.config import ConfigError
    from ftx.data import DataError
    from ftx.train import train

    try:
        record = train(cfg)
    except (ConfigError, DataError) as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        # A clear message, no traceback: the user fixes a value, not the code.
        print(f"ftx: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return record["quality"]["eval_loss"]


if __name__ == "__main__":
    main()
