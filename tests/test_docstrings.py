"""Public docstrings: every public function documents Args/Returns/Raises and has an Example that runs
(doctest, executed here so that the README's test command runs them too)."""

import doctest
import importlib

import pytest

import lite_fn as lf

MODULES = [
    "lite_fn.runtime",
    "lite_fn.trees",
    "lite_fn.io",
    "lite_fn.variants",
    "lite_fn.peft_io",
    "lite_fn.adapted",
    "lite_fn.train",
    "lite_fn.merging",
]
PUBLIC = [
    "init",
    "call",
    "applied",
    "stack",
    "unstack",
    "with_alpha",
    "merge",
    "save",
    "load",
    "load_metadata",
    "partition",
    "combine",
    "trainable",
    "target_paths",
    "register_variant",
    "load_peft",
    "save_peft",
    "merge_adapters",
    "Adapted",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", PUBLIC)
def test_public_docstring_has_sections_and_example(name):
    doc = getattr(lf, name).__doc__ or ""
    assert "Example" in doc and ">>>" in doc, f"lf.{name} has no runnable Example"
    assert "Args:" in doc or name in ("Adapted",), f"lf.{name} documents no Args"
    assert "Returns:" in doc or "Raises:" in doc, f"lf.{name} documents neither Returns nor Raises"
