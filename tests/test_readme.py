"""The README is the contract: every python block runs as written; the shell blocks are what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_every_block_is_checked():
    assert BLOCKS and all(lang in ("python", "bash") for lang, _ in BLOCKS), [lang for lang, _ in BLOCKS]


def test_python_blocks_run_in_order(capsys):
    namespace = {"__name__": "__readme__"}
    python = [code for lang, code in BLOCKS if lang == "python"]
    assert len(python) >= 5
    for i, code in enumerate(python):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # name the failing block
            raise AssertionError(f"README python block {i} failed: {e!r}\n{code}") from e


def test_shell_blocks_match_ci():
    shell = [code.strip() for lang, code in BLOCKS if lang == "bash"]
    setup, tests = shell[0], shell[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be the one .ci/run runs"
    assert "pip install torch==2.13.0" in setup and "python -m lite_fn.demo" in setup
    for step in ("pip install torch==2.13.0", 'pip install -e ".[test,demo]"'):
        assert step in setup and step.replace("pip install", "python -m pip install -q") in ci
