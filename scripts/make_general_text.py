"""Generate datasets/general/python_docs_heldout.txt: general text for forgetting.

    python scripts/make_general_text.py

Docstrings of stdlib modules that ftx's base model never saw in pretraining
(ftx.models.pretrain uses pydoc topics and a fixed module list), so perplexity on
it before and after fine-tuning measures how much general ability a method loses.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from ftx.models.pretrain import _DOC_MODULES

MODULES = [
    "calendar",
    "configparser",
    "queue",
    "sched",
    "bisect",
    "tempfile",
    "glob",
    "fnmatch",
    "copy",
    "pprint",
    "optparse",
    "gettext",
    "shlex",
    "socketserver",
    "smtplib",
    "mailbox",
    "wave",
    "colorsys",
    "codecs",
    "locale",
    "tokenize",
    "ast",
    "doctest",
    "cmd",
    "uuid",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "html.parser",
    "plistlib",
    "mimetypes",
    "getopt",
    "filecmp",
    "fileinput",
    "linecache",
    "weakref",
    "numbers",
    "operator",
    "graphlib",
    "zoneinfo",
    "selectors",
]


def main() -> None:
    assert not set(MODULES) & set(_DOC_MODULES), "held-out modules overlap the pretraining corpus"
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) else None
            if doc and len(doc) > 300 and getattr(member, "__module__", None) == name:
                docs.append(doc)
    out = Path(__file__).parents[1] / "datasets/general/python_docs_heldout.txt"
    out.write_text("\n\n".join(docs)[:60_000] + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(docs)} docstrings)")


if __name__ == "__main__":
    main()
