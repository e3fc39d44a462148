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
                             ftx train method=rlhf   (reward model, then RLOO)
                             ftx train --cfg job      (print the composed config)
                             ftx train --help         (config groups and options)

  eval TARGET [overrides]
                        score a run directory or a model directory on the data
                        of its config (or data=..., data.eval_file=...)
  generate TARGET --prompt TEXT [--max-new-tokens N]
                        greedy completion with the run's prompt template
  export RUN_DIR --out DIR [--adapter-only]
                        merge the adapter into the base (dequantized for QLoRA):
                        a directory that loads with AutoModelForCausalLM
  data validate [overrides]
                        check the data of a config: every problem as
                        file:line, over-length examples, a token statistics
                        table (e.g. ftx data validate data=custom
                        data.train_file=my.jsonl); exit 2 on bad data

  report PATH... [--out DIR]
                        table of runs sorted by quality, Pareto front marked:
                        writes report.md, trials.csv, pareto.png (default: in PATH)

Every value of `ftx train --cfg job` can be overridden as key=value.
"""

COMMANDS = ("train", "data", "eval", "generate", "export", "report")


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
    if command == "train":
        run_hydra(train_job, rest, prog="ftx train")
        return
    try:
        {"data": data, "eval": evaluate, "generate": generate, "export": export, "report": report}[command](rest)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"ftx {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def load_target(target: str, overrides: list[str]):
    """(model, tokenizer, cfg) for a run directory (its own config, plus overrides)
    or a plain model directory (the default config with model=hf)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ftx.config import compose_config, validate

    path = Path(target)
    run_overrides = path / ".hydra" / "overrides.yaml"
    if run_overrides.is_file():
        base_overrides = [*OmegaConf.load(run_overrides), f"paths.output_dir={path}"]
    else:
        base_overrides = ["model=hf", f"model.name_or_path={target}", f"paths.output_dir={path}"]
    cfg = compose_config([*base_overrides, *overrides])
    validate(cfg)
    if run_overrides.is_file():
        from ftx.models.export import load_run

        model, tokenizer = load_run(path)
    else:
        from transformers import AutoModelForCausalLM

        from ftx.models import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=not cfg.model.allow_download).eval()
        tokenizer = load_tokenizer(cfg, target)
    return model, tokenizer, cfg


def data(args: list[str]) -> None:
    """ftx data validate [overrides]: the checks ``ftx train`` runs on its data,
    with every problem listed, and what the data costs per epoch."""
    if not args or args[0] != "validate":
        raise ValueError("usage: ftx data validate [overrides]")
    from ftx.config import compose_config, validate
    from ftx.data import load_splits

    cfg = compose_config([*args[1:], "paths.output_dir=."])
    validate(cfg)
    splits = load_splits(cfg, shown=1000)
    data_cfg = cfg.data
    print(
        f"{data_cfg.train_file}: format {splits.format} ({splits.kind}), {len(splits.train)} train / "
        f"{len(splits.eval)} eval rows, {splits.skipped} invalid row(s) skipped"
    )
    from ftx.data.tokenized import stats_table, tokenize_split
    from ftx.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(cfg, resolve_base(cfg))
    stats = {}
    for name, records in (("train", splits.train), ("eval", splits.eval)):
        if splits.kind == "preference":
            pairs = [record.as_examples() for record in records]
            for index, side in enumerate(("chosen", "rejected")):
                examples = [pair[index] for pair in pairs]
                stats[f"{name} ({side})"] = tokenize_split(cfg, tokenizer, examples, packing=False).stats
        else:
            stats[name] = tokenize_split(cfg, tokenizer, records, packing=data_cfg.packing and name == "train").stats
    print(stats_table(stats, cfg.trainer.batch_size, data_cfg.max_length))
    for name, split in stats.items():
        for where in split.over_length:
            print(f"warning: {where}: longer than data.max_length={data_cfg.max_length} ({name}); truncated")
        if split.truncated > len(split.over_length):
            print(f"warning: … and {split.truncated - len(split.over_length)} more in {name}")
        if split.untrained:
            print(f"warning: {split.untrained} {name} example(s) have no trained token left after truncation")


def evaluate(args: list[str]) -> None:
    import json

    if not args or args[0].startswith("-"):
        raise ValueError("usage: ftx eval TARGET [overrides]")
    from ftx.data import load_splits
    from ftx.evaluation import evaluate as scores_of

    model, tokenizer, cfg = load_target(args[0], args[1:])
    scores = scores_of(cfg, model, tokenizer, load_splits(cfg).eval)
    print(json.dumps({"target": args[0], "data": cfg.data.name, "quality": scores}, indent=2))


def generate(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftx generate", description="Greedy completion of a prompt.")
    parser.add_argument("target", help="run directory or model directory")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: data.max_new_tokens")
    options = parser.parse_args(args)
    from ftx.data import load_splits
    from ftx.data.tokenized import renderer_for
    from ftx.evaluation import generate as complete

    model, tokenizer, cfg = load_target(options.target, [])
    renderer = renderer_for(cfg, tokenizer)
    chat = load_splits(cfg).train[0].is_chat  # prompts are shown as the run's data was
    prompts = [renderer.encode_prompt(renderer.user_example(p, chat)) for p in options.prompt]
    for prompt, completion in zip(
        options.prompt,
        complete(model, tokenizer, prompts, options.max_new_tokens or cfg.data.max_new_tokens),
        strict=True,
    ):
        print(f"{prompt}\n→ {completion}")


def export(args: list[str]) -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="ftx export", description="Export a run as a Hugging Face directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="new directory to write")
    parser.add_argument("--adapter-only", action="store_true", help="copy the PEFT adapter instead of merging")
    options = parser.parse_args(args)
    from ftx.models.export import export_run

    out = export_run(Path(options.run_dir), Path(options.out), adapter_only=options.adapter_only)
    print(f"wrote {out}")


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
    from ftx.rlhf import train_rlhf
    from ftx.train import train

    try:
        record = (train_rlhf if cfg.method.name == "rlhf" else train)(cfg)
    except (ConfigError, DataError) as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        # A clear message, no traceback: the user fixes a value, not the code.
        print(f"ftx: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return record["quality"]["eval_loss"]


if __name__ == "__main__":
    main()
