"""The ``ftx`` command. Imports only Hydra and the config schema at start-up;
each command imports what it needs when it runs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

USAGE = """usage: ftx COMMAND [overrides]

Fine-tuning as a declarative experiment (Hydra configs, Lightning, PEFT).

commands:
  train [overrides]     train one run; -m/--multirun for one run per combination
                        e.g. ftx train method=qlora method.r=32 optim.lr=2e-4
                             ftx train -m method=full,lora,qlora
                             ftx train method=rlhf   (reward model, then RLOO)
                             ftx train --cfg job      (print the composed config)
                             ftx train --help         (config groups and options)

  plan [--compare] [--json] [overrides]
                        predict peak memory (broken down), trainable share,
                        artefact size, time and cost, without loading weights;
                        exits 1 when it does not fit plan.budget_gb (or the GPU)
                        e.g. ftx plan model=llama31_8b method=qlora trainer=gpu
                             ftx plan --compare model=llama31_8b trainer=gpu
                             ftx plan model=llama31_70b method=full plan.budget_gb=24

  sweep NAME [overrides]
                        an Optuna study over sweeps/NAME.yaml as a Hydra multirun
                        (= ftx train -m sweep=NAME); resumes when run again
                        e.g. ftx sweep lora_rank_lr hydra.sweeper.n_trials=40
                             ftx sweep quality_vs_vram hydra/launcher=joblib hydra.launcher.n_jobs=2
                             ftx sweep lora_rank_lr --plan   (trials, memory and time; no training)
                             ftx sweep --list
  eval TARGET [overrides]
                        score a run directory or a model directory on the data
                        of its config (or data=..., data.eval_file=...)
  generate TARGET --prompt TEXT [--max-new-tokens N] [--json]
                        the greedy answer to each prompt, through the run's
                        templates, ending where the model's turn ends
  export RUN_DIR --out DIR [--adapter-only]
                        merge the adapter into the base (dequantized for QLoRA):
                        a directory that loads with AutoModelForCausalLM
  export RUN_DIR --format gguf --out PATH [--gguf-type f16|bf16|q8_0]
                        the merged model as one GGUF file, tokenizer and chat
                        template inside, for llama.cpp / Ollama (Llama, Mistral,
                        Qwen2); PATH a .gguf file or a directory (model-TYPE.gguf)
  data validate [overrides]
                        check the data of a config: every problem as
                        file:line, over-length examples, a token statistics
                        table (e.g. ftx data validate data=custom
                        data.train_file=my.jsonl); exit 2 on bad data

  report PATH... [--out DIR]
                        table of runs sorted by quality, Pareto front marked:
                        writes report.md, trials.csv, pareto.png and report.html
                        (one self-contained page for a browser; default: in PATH)

Every value of `ftx train --cfg job` can be overridden as key=value.
"""

COMMANDS = ("train", "sweep", "plan", "data", "eval", "generate", "export", "report")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS and os.environ.get("LOCAL_RANK", "0") != "0":
        # A rank that Lightning's ddp started by re-running the command line: it
        # repeats `ftx train`'s arguments without the command (plus the run directory).
        command, rest = "train", argv
    if command not in COMMANDS:
        print(f"ftx: unknown command {command!r}; choose from: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if command == "train":
        run_hydra(train_job, rest, prog="ftx train")
        return
    if command == "sweep":
        sweep(rest)
        return
    try:
        commands = {"plan": plan, "data": data, "eval": evaluate, "generate": generate, "export": export}
        (commands | {"report": report})[command](rest)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"ftx {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def load_target(target: str, overrides: list[str]):
    """(model, tokenizer, cfg) for a run directory (its own config, plus overrides)
    or a plain model directory (the default config with model=hf)."""

    from omegaconf import OmegaConf

    from ftx.config import compose_config, validate

    path = Path(target)
    run_overrides, run_config = path / ".hydra" / "overrides.yaml", path / ".hydra" / "config.yaml"
    if run_overrides.is_file():  # a run Hydra started: compose it again, so group overrides work
        cfg = compose_config([*OmegaConf.load(run_overrides), f"paths.output_dir={path}", *overrides])
    elif run_config.is_file():  # a run given paths.output_dir=, or the Python API: ftx saved it resolved
        cfg = saved_config(path, [f"paths.output_dir={path}", *overrides])
    else:
        cfg = compose_config(["model=hf", f"model.name_or_path={target}", f"paths.output_dir={path}", *overrides])
    validate(cfg)
    from ftx.objectives import OBJECTIVES

    if OBJECTIVES.fact(cfg.objective.name, "HEAD") == "reward":
        raise ValueError(
            f"{target} is a reward model (objective=reward): it scores sequences rather than generating. "
            "Its adapter/ loads with AutoModelForSequenceClassification(num_labels=1) + PeftModel; "
            "its held-out figures are in metrics.json."
        )
    if run_config.is_file():
        from ftx.runs import load_run

        model, tokenizer = load_run(path)
    else:
        from transformers import AutoModelForCausalLM

        from ftx.models import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(
            target, local_files_only=not cfg.model.allow_download, use_safetensors=True
        ).eval()
        tokenizer = load_tokenizer(cfg, target)
    return model, tokenizer, cfg


def saved_config(run_dir: Path, overrides: list[str]):
    """A run's saved config with ``key.sub=value`` overrides; a group choice
    (``data=NAME``) cannot be re-made from a resolved config, so it is refused."""
    from omegaconf import DictConfig, OmegaConf

    from ftx.runs import run_config

    cfg, absent = run_config(run_dir), object()
    for override in overrides:
        key = override.split("=", 1)[0]
        current = OmegaConf.select(cfg, key, default=absent)
        if current is absent:
            raise ValueError(f"{override}: {run_dir}/.hydra/config.yaml has no key {key}")
        if "=" not in override or isinstance(current, DictConfig):
            raise ValueError(
                f"{override}: {run_dir} has no .hydra/overrides.yaml to compose again "
                f"(it was not started by Hydra), so only value overrides apply: set {key}.KEY=VALUE."
            )
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key), merge=False)
    return cfg


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
    from ftx.data.tokenized import stats_table, tokenize_pairs, tokenize_split
    from ftx.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(cfg, resolve_base(cfg))
    stats = {}
    for name, records in (("train", splits.train), ("eval", splits.eval)):
        if splits.kind == "preference":
            for side, side_stats in tokenize_pairs(cfg, tokenizer, records).stats.items():
                stats[f"{name} ({side})"] = side_stats
        else:
            stats[name] = tokenize_split(cfg, tokenizer, records, packing=data_cfg.packing and name == "train").stats
    print(stats_table(stats, cfg.trainer.batch_size, data_cfg.max_length))
    for name, split in stats.items():
        for where in split.over_length:
            print(f"warning: {where}: longer than data.max_length={data_cfg.max_length} ({name}); truncated")
        if split.truncated > len(split.over_length):
            print(f"warning: … and {split.truncated - len(split.over_length)} more in {name}")
        if split.refused:
            print(
                f"warning: {len(split.refused)} {name} example(s) the chat template refused were skipped "
                "(data.on_error=skip)"
            )
        for where in split.untrained_at:
            print(f"warning: {where}: no trained token left after truncation to data.max_length ({name})")
        if split.untrained > len(split.untrained_at):
            print(f"warning: … and {split.untrained - len(split.untrained_at)} more with no trained token in {name}")


def plan(args: list[str]) -> None:
    """Print the planner's prediction for ``ftx train`` with the same overrides."""
    import json

    options = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    unknown = set(options) - {"--compare", "--json"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]}; usage: ftx plan [--compare] [--json] [overrides]")
    from ftx.memory.plan import (
        METHODS,
        alternatives,
        compare_table,
        describe,
        method_overrides,
        plan_overrides,
        verdict,
    )

    if "--compare" in options:
        plans = [plan_overrides(method_overrides(overrides, method)) for method in METHODS]
        if "--json" in options:
            print(json.dumps([p.as_dict() for p in plans], indent=2))
            return
        print(compare_table(plans))
        return
    predicted = plan_overrides(overrides)
    if "--json" in options:
        print(json.dumps(predicted.as_dict(), indent=2))
        return
    text = describe(predicted)
    if predicted.fits is False:  # say plainly what would fit instead, and exit 1 for scripts
        text = text.replace(verdict(predicted), verdict(predicted, alternatives(overrides, predicted)))
    print(text)
    if predicted.fits is False:
        raise SystemExit(1)


def evaluate(args: list[str]) -> None:
    import json

    if not args or args[0].startswith("-"):
        raise ValueError("usage: ftx eval TARGET [overrides]")
    from ftx import objectives
    from ftx.data import load_splits
    from ftx.evaluation import figures

    model, tokenizer, cfg = load_target(args[0], args[1:])
    scores = objectives.load(cfg.objective.name).evaluate(cfg, model, tokenizer, load_splits(cfg))
    print(json.dumps({"target": args[0], "data": cfg.data.name, "quality": figures(scores)}, indent=2))


def generate(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftx generate", description="The greedy answer to each prompt.")
    parser.add_argument("target", help="run directory or model directory")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: data.max_new_tokens")
    parser.add_argument("--json", action="store_true", help='one {"prompt", "answer"} JSON object per line')
    options = parser.parse_args(args)
    import json

    from ftx.data import Preference, load_splits
    from ftx.data.tokenized import renderer_for
    from ftx.evaluation import generate as complete
    from ftx.evaluation import stop_ids

    model, tokenizer, cfg = load_target(options.target, [])
    renderer = renderer_for(cfg, tokenizer)
    first = load_splits(cfg).train[0]
    first = first.as_examples()[0] if isinstance(first, Preference) else first
    chat = first.is_chat  # prompts are shown as the run's data was
    prompts = [renderer.encode_prompt(renderer.user_example(p, chat)) for p in options.prompt]
    limit = options.max_new_tokens or cfg.data.max_new_tokens
    answers = complete(model, tokenizer, prompts, limit, stop_ids(model, renderer))
    for prompt, answer in zip(options.prompt, answers, strict=True):
        # The answer alone (it ends where the model's turn ends), as scripts read it.
        print(json.dumps({"prompt": prompt, "answer": answer}) if options.json else answer)


def export(args: list[str]) -> None:
    import argparse

    from ftx.gguf import DEFAULT_GGUF_TYPE, GGUF_TYPES  # tables only: gguf and torch load when it writes

    parser = argparse.ArgumentParser(
        prog="ftx export", description="Export a run as a Hugging Face directory or a GGUF file."
    )
    parser.add_argument("run_dir")
    parser.add_argument(
        "--out", required=True, help="hf: a new directory; gguf: a .gguf file, or a directory for model-TYPE.gguf"
    )
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf (llama.cpp)")
    parser.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        help=f"GGUF weight type (default {DEFAULT_GGUF_TYPE}; q8_0 is about half the size, at 8-bit rounding)",
    )
    parser.add_argument("--adapter-only", action="store_true", help="copy the PEFT adapter instead of merging")
    options = parser.parse_args(args)
    if options.format == "hf":
        if options.gguf_type is not None:
            raise ValueError("--gguf-type applies to --format gguf only")
        from ftx.runs import export_run

        out = export_run(Path(options.run_dir), Path(options.out), adapter_only=options.adapter_only)
    else:
        if options.adapter_only:
            raise ValueError("--adapter-only writes a PEFT adapter; a GGUF file holds the merged model (drop one)")
        from ftx.gguf import export_gguf

        try:
            out = export_gguf(Path(options.run_dir), Path(options.out), options.gguf_type or DEFAULT_GGUF_TYPE)
        except ImportError as error:  # the gguf package is an extra
            print(f"ftx export: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"wrote {out}")


def report(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ftx report", description="Compare runs: quality against peak memory.")
    parser.add_argument("paths", nargs="+", help="run directories, or sweep/output directories holding them")
    parser.add_argument(
        "--out", help="where report.md, trials.csv, pareto.png and report.html go (default: the single PATH, else .)"
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
    written = ", ".join(str(out_dir / name) for name in ("report.md", "trials.csv", "pareto.png", "report.html"))
    print(f"\nwrote {written}")


def sweep(args: list[str]) -> None:
    """``ftx sweep NAME [overrides]`` is ``ftx train -m sweep=NAME [overrides]``."""
    from ftx.config import sweep_files

    names = {path.stem: path for path in sweep_files()}
    if not args or args[0] in ("-h", "--help", "--list"):
        print("sweeps (sweeps/NAME.yaml; ftx sweep NAME [overrides]):")
        for name, path in names.items():
            print(f"  {name:20s} {_summary_line(path)}")
        return
    if args[0] not in names:
        print(f"ftx sweep: no sweep {args[0]!r}; choose from: {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    if "--plan" in args:
        from ftx.config import ConfigError
        from ftx.sweep import plan_sweep

        try:
            print(plan_sweep(args[0], [a for a in args[1:] if a != "--plan"]))
        except ConfigError as error:
            print(f"ftx sweep: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    run_hydra(train_job, ["-m", f"sweep={args[0]}", *args[1:]], prog="ftx sweep")


def _summary_line(path) -> str:
    """The first sentence of a sweep file's header after its commands: what it searches."""
    comments = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    prose = " ".join(c for c in comments if c and not c.startswith(("ftx ", "@package")))
    return prose.split(". ")[0].rstrip(".") + "."


def run_hydra(task, args: list[str], prog: str) -> None:
    """Run ``task`` as a Hydra app over ftx's config tree with ``args`` as overrides."""
    import hydra

    from ftx.config import config_dir, register_configs, register_resolvers

    register_configs()
    register_resolvers()
    # argv[0] stays the real entry point: Lightning's ddp re-runs it for the other ranks.
    sys.argv = [sys.argv[0] if sys.argv and Path(sys.argv[0]).exists() else prog, *args]
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)
    with _reuse_search_path() if "--help" in args or "-h" in args else contextlib.nullcontext():
        app()


@contextlib.contextmanager
def _reuse_search_path():
    """Hydra 1.3's --help asks for the options of each config group (~90 queries),
    and each query re-reads the search path and deep-copies the primary config:
    3 s. Help composes nothing, so one reading serves all of them: 0.3 s. Hydra's
    own method is back in place afterwards (ftx.cli.main may run again in-process)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = getattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo", None)
    if original is None:  # another Hydra version: slower help, same text
        yield
        return
    readings: dict = {}

    def reuse(self, config_name, overrides):
        key = (id(self), config_name, tuple(overrides))
        if key not in readings:
            readings[key] = original(self, config_name, overrides)
        return readings[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = reuse
    try:
        yield
    finally:
        ConfigLoaderImpl._parse_overrides_and_create_caching_repo = original


def train_job(cfg) -> dict:
    """Hydra task for ``ftx train``; returns the run record (ftx's sweeper reads its
    objectives from it). A trial of ftx's sweeper also reports to its study."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ftx.config import ConfigError
    from ftx.data import DataError
    from ftx.rlhf import train_rlhf
    from ftx.train import train

    try:
        run = train_rlhf if cfg.method.name == "rlhf" else train
        if cfg.sweep_trial.trial_id is None:
            record = run(cfg)
        else:
            from ftx.sweep import trial_link

            hydra_cfg = HydraConfig.get()
            with trial_link(cfg, hydra_cfg.sweeper, hydra_cfg.sweep.dir) as callbacks:
                record = run(cfg, callbacks)
    except (ConfigError, DataError) as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        # A clear message, no traceback: the user fixes a value, not the code.
        print(f"ftx: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if record["status"] == "pruned":
        print(f"ftx: pruned: {record['reason']}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
