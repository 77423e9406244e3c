"""The package's floors: the model imports nothing of the runtime, pipeline or command line; no import cycles;
the scripts answer --help and refuse bad flags without importing torch; every flag comes from one table."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import FLAGS, build_parser, remake_command

ROOT = Path(__file__).resolve().parents[1]
MODEL_FLOOR = (
    "ldm.models",
    "ldm.modules",
    "ldm.util",
    "ldm.checkpoint",
    "ldm.lr_scheduler",
    "ldm.errors",
    "ldm.files",
)
UPPER_FLOORS = (
    "ldm.runtime", "ldm.pipeline", "ldm.cli", "ldm.latents", "ldm.loading", "ldm.outputs", "ldm.prompts",
    "ldm.adapters", "ldm.server", "ldm.evaluation", "ldm.infotext", "ldm.heap",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ldm_imports() -> dict[str, set[str]]:
    """Every ldm module -> the ldm modules it imports (anywhere in the file, lazy imports too)."""
    modules = {module_name(p): p for p in (ROOT / "ldm").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_model_floor_imports_nothing_above_it():
    graph = ldm_imports()
    offending = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(MODEL_FLOOR)
        for target in targets
        if target.startswith(UPPER_FLOORS)
    }
    assert offending == set()


def test_no_import_cycles():
    graph = ldm_imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                # a package's __init__ importing its own submodules is not a cycle in the layering sense
                cycle = [*path[path.index(target) :], target]
                if not all(m.startswith(target) or target.startswith(m) for m in cycle):
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def imports_torch(script: str, *args: str) -> tuple[bool, subprocess.CompletedProcess]:
    """Run a script's main through run_cli in a child; report whether torch got imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{list(args)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / script)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('torch' in sys.modules, file=sys.stderr)\n"
        "    raise\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    *message, verdict = result.stderr.strip().splitlines()
    result.stderr = "\n".join(message)
    return verdict == "True", result


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("txt2img.py", ["--help"], None),
        (
            "img2img.py",
            ["--init-img", "x.png", "--strength", "1.5"],
            "--strength must be between 0.0 and 1.0",
        ),
        ("inpaint.py", ["--ddim_steps", "0"], "--ddim_steps must be between 1 and 1000, got 0"),
        ("txt2img.py", ["--scale", "nan"], "--scale must be a finite number"),
        ("txt2img.py", ["--sampler", "no-such"], "unknown sampler 'no-such'"),
        ("txt2img.py", ["--n_samples", "two"], "invalid int value"),
    ],
)
def test_help_and_refused_flags_do_not_import_torch(script, args, message):
    torch_imported, result = imports_torch(script, *args)
    assert not torch_imported
    if message is None:
        assert result.returncode == 0 and "--ddim_steps" in result.stdout
    else:
        assert result.returncode == 2
        assert result.stderr.count("\n") == 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["txt2img", "img2img", "inpaint"])
def test_help_shows_every_default(script):
    text = "".join(build_parser(script, None).format_help().split())  # help wraps lines at spaces and hyphens
    for flag in FLAGS:
        default = flag.default_for(script)
        if script in flag.scripts and flag.type is not None and default not in (None, ""):
            assert "".join(f"(default:{default})".split()) in text, flag.name


def test_remake_command_holds_exactly_the_flags_that_change_the_image():
    opt = build_parser("txt2img", None).parse_args(["--vae-tiling", "--threads", "1", "--sampler", "plms"])
    opt.sampler, opt.precision = "plms", "full"
    command = remake_command("txt2img", opt, "a cat", 7, 1)
    assert "--vae-tiling" in command and "--threads" not in command and "--sampler plms" in command
    assert command.startswith("python scripts/txt2img.py --prompt 'a cat' --seed 7 --n_samples 1 --n_iter 1")
