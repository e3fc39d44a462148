"""Each extension point is one registry, and everything that names its plugins
agrees with it: the conf/ group's files, the schema's choices (what validate
accepts), the schema's own documentation of the key, and `ftx train --help`.
Adding a plugin without its YAML, or documenting one that does not exist, fails here."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from conftest import ftx_main
from omegaconf import OmegaConf

from ftx.adapters import ADAPTERS
from ftx.config import ConfigError, choices, compose_config, config_dir, validate
from ftx.data.formats import FORMATS
from ftx.metrics import SETTINGS, TASK_METRICS
from ftx.objectives import OBJECTIVES
from ftx.tracking.loggers import LOGGERS

SCHEMA = Path(inspect.getfile(choices)).with_name("schema.py")


def field_doc(cls: str, name: str) -> str:
    """The docstring written under a schema field (``name: type = default`` then ``\"\"\"…\"\"\"``)."""
    tree = ast.parse(SCHEMA.read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls).body
    for field, doc in zip(body, body[1:], strict=False):
        if isinstance(field, ast.AnnAssign) and field.target.id == name:
            return doc.value.value
    raise AssertionError(f"{cls}.{name} has no docstring")


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / name).glob("*.yaml"))


def option(group_name: str, path: Path):
    """The group's node of one option file (written in its package, or in _global_)."""
    conf = OmegaConf.load(path)
    return conf.get(group_name, conf)


@pytest.fixture(scope="module")
def help_text() -> str:
    out = ftx_main("train", "--help")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_objectives_agree_with_conf_choices_schema_and_help(help_text):
    names = OBJECTIVES.names()
    assert {"sft", "reward", "dpo", "rloo", "grpo"} <= set(names)
    assert group("objective") == names
    assert sorted(choices()["objective.name"]) == names
    assert f"objective: {', '.join(names)}" in help_text
    documented = field_doc("ObjectiveConfig", "name")
    for name in names:
        assert re.search(rf"\b{name}\b", documented), f"ObjectiveConfig.name does not document {name}"
        assert option("objective", config_dir() / "objective" / f"{name}.yaml").name == name
        module = OBJECTIVES.load(name)  # the literals the registry read are the module's own
        assert (OBJECTIVES.fact(name, "KIND"), OBJECTIVES.fact(name, "HEAD")) == (module.KIND, module.HEAD)
        assert module.KIND in ("sft", "preference", "prompts") and module.HEAD in ("causal_lm", "reward")
        assert callable(module.loaders) and callable(module.evaluate) and inspect.isclass(module.Module)
    assert "base" not in names and "policy_gradient" not in names and "rewards" not in names  # helpers


def test_loggers_agree_with_conf_choices_schema_and_help(help_text):
    names = LOGGERS.names()
    assert group("logger") == names == sorted(choices()["logger.name"])
    assert f"logger: {', '.join(names)}" in help_text
    for name in names:
        assert re.search(rf"\b{name}\b", field_doc("LoggerConfig", "name"))
        assert option("logger", config_dir() / "logger" / f"{name}.yaml").name == name
        assert callable(LOGGERS.load(name).make)


def test_adapters_agree_with_the_methods_and_plan_with_their_own_terms():
    names = ADAPTERS.names()
    assert names == ["lora"]
    assert choices()["method.adapter"] == (None, *names)
    for path in (config_dir() / "method").glob("*.yaml"):
        assert option("method", path).get("adapter", "lora") in (None, *names), path
    hooks = ("peft_config", "tensors", "cast_numels", "saved_per_token", "temporaries", "flops_per_token")
    for name in names:
        module = ADAPTERS.load(name)
        missing = [hook for hook in (*hooks, "check", "rewrites_base") if not callable(getattr(module, hook, None))]
        assert not missing, f"adapter {name} lacks {missing}: ftx plan would have no terms for it"


def test_an_unknown_adapter_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"method.adapter=ia3 is not one of: null, lora"):
        validate(compose_config(["method.adapter=ia3"]))


def test_formats_agree_with_choices_and_their_documentation():
    assert choices()["data.format"] == ("auto", *FORMATS)
    documented = field_doc("DataConfig", "format")
    table = inspect.getmodule(FORMATS["chat"].parse).__doc__
    for name, fmt in FORMATS.items():
        assert fmt.name == name and re.search(rf"\b{name}\b", documented), name
        assert f"| `{name}`" in table, f"the formats table does not show {name}"


def test_task_metrics_serve_checks_evaluation_and_rewards():
    documented = field_doc("DataConfig", "task_metric")
    for name in (*TASK_METRICS, *SETTINGS):
        assert name in documented, name
        validate(compose_config([f"data.task_metric={name}", "data.regex=x+", "data.json_schema=pyproject.toml"]))
    for name in TASK_METRICS:  # every (prediction, reference) metric is a reward function too
        assert name in field_doc("ObjectiveConfig", "reward_functions")
    with pytest.raises(ConfigError, match="not one of exact_match, contains, json_valid, json_fields, regex"):
        validate(compose_config(["data.task_metric=bleu"]))
