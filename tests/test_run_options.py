"""RunOptions: one object for how a job runs, accepted by every API call; the keyword form still
works and gives the same artifact; the CLI builds one per command."""
import pytest

from tensorstore_llm import api
from tensorstore_llm.engine.options import RunOptions


def _dare(family):
    return (f"merge_method: dare_linear\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n")


def test_options_and_keywords_give_the_same_artifact(store, tiny_family):
    by_options = api.merge(store, _dare(tiny_family), options=RunOptions(seed=3, max_memory="16K", progress=False))
    by_keywords = api.merge(store, _dare(tiny_family), seed=3, max_memory="1M", progress=False)
    other_seed = api.merge(store, _dare(tiny_family), options=RunOptions(seed=4, progress=False))
    assert by_options.artifact.id == by_keywords.artifact.id
    assert by_options.artifact.manifest.tensors == by_keywords.artifact.manifest.tensors
    assert other_seed.artifact.manifest.tensors != by_options.artifact.manifest.tensors   # DARE masks follow the seed


def test_keywords_override_options_and_unknown_ones_are_refused(store, tiny_family):
    estimate_only = api.weighted_sum(store, [tiny_family["ft1"], tiny_family["ft2"]], [0.5, 0.5],
                                     options=RunOptions(progress=False), dry_run=True)
    assert estimate_only.artifact is None and estimate_only.estimate.jobs
    assert RunOptions.of(RunOptions(seed=1), seed=2) == RunOptions(seed=2)
    with pytest.raises(TypeError, match="unknown run option"):
        RunOptions.of(None, max_memroy="1G")
    with pytest.raises(TypeError, match="must be a RunOptions"):
        RunOptions.of({"seed": 1})


def test_the_cli_builds_one_options_object(cli, tmp_path, tiny_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_dare(tiny_family))
    code, out, err = cli("--store", tmp_path / "s", "-q", "merge", recipe, "--seed", "3", "--max-memory", "16K")
    assert code == 0, err
    from tensorstore_llm.store import Store

    again = api.merge(Store(str(tmp_path / "s")), _dare(tiny_family), options=RunOptions(seed=3, progress=False))
    assert out.strip() == again.artifact.id


def test_the_executor_takes_a_run_options(tiny_family):
    """Executor(plan, sink, RunOptions(...)): its device, budget, seed and progress come from it;
    keywords still override a field, an unknown one is refused."""
    from tensorstore_llm.engine import Executor, plan_map
    from tensorstore_llm.io import HFCheckpointSource
    from tensorstore_llm.units import parse_size

    with HFCheckpointSource(tiny_family["base"]) as source:
        plan = plan_map("copy", {"src": source}, {"x": "src"})
        executor = Executor(plan, None, RunOptions(device="cpu", max_memory="64K", seed=5, progress=False))
        assert (executor.device.type, executor.budget, executor.seed, executor.progress_enabled) == \
            ("cpu", parse_size("64K"), 5, False)
        assert executor.options == RunOptions(device="cpu", max_memory="64K", seed=5, progress=False)
        assert Executor(plan, None, RunOptions(max_memory="64K"), max_memory="1M", device="cpu").budget == parse_size("1M")
        with pytest.raises(TypeError, match="unknown run option"):
            Executor(plan, None, max_memroy="1M")


def _commands():
    """(path, click command) of every tsllm command, groups expanded."""
    import click

    from tensorstore_llm_cli import cli

    out = []

    def walk(group, prefix):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                out.append((prefix + name, command))
    walk(cli, "")
    return out


def test_cli_run_options_are_declared_once_and_only_where_they_mean_something():
    from tensorstore_llm_cli.common import size_option

    commands = dict(_commands())
    options = {path: {p.name: p for p in command.params} for path, command in commands.items()}
    for path, params in options.items():
        for size in ("max_memory", "max_shard_size"):   # checked as sizes everywhere (a usage error if not)
            if size in params:
                assert params[size].callback is size_option, (path, size)
    # commands that only move stored values draw nothing and compute nothing on a device
    for path in ("import", "export"):
        assert "device" not in options[path] and "seed" not in options[path], path
    for path in ("convert", "weighted-sum", "lora merge", "lora init", "prune", "soup"):
        assert "seed" not in options[path] or path == "prune", path    # prune's --seed seeds its search
    assert "dry_run" not in options["lora combine"]                     # it cannot estimate; it used to refuse the flag
    for path in ("merge", "lora combine", "lora extract", "diff-stats"):
        assert "seed" in options[path] and "device" in options[path], path


def test_no_command_module_declares_a_run_option_of_its_own():
    """--device, --max-memory, --seed, --compression and --dry-run come from cli/common.py only."""
    import ast
    import os

    import tensorstore_llm_cli

    run_flags = {"--device", "--max-memory", "--seed", "--compression", "--dry-run"}
    folder = os.path.dirname(tensorstore_llm_cli.__file__)
    offenders = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "common.py":
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "option":
                flags = {a.value for a in node.args if isinstance(a, ast.Constant)}
                offenders += [f"{name}:{node.lineno} {flag}" for flag in sorted(flags & run_flags)]
    assert not offenders, offenders


def test_api_reexports_the_lower_run_module():
    """Domain packages import tensorstore_llm.runs; users keep importing the names from api."""
    from tensorstore_llm import runs

    for name in ("JobResult", "open_store", "resolve_input", "run_plan", "export"):
        assert getattr(api, name) is getattr(runs, name), name


def test_codec_parameters_of_the_wrong_type_or_domain_are_codec_errors(cli, tmp_path, tiny_family):
    """--param values reach the codec checked: a string or fraction for a rank, a number for a
    flag, a rank below 1 are exit 4 with the parameter named, not a traceback or a silent
    rank-(k-1) result."""
    s = str(tmp_path / "s")
    for name, ref in (("base", tiny_family["base"]), ("ft", tiny_family["ft1"])):
        assert cli("--store", s, "-q", "import", ref, "--name", name)[0] == 0
    for codec, param, named in (("low-rank", "rank=abc", "rank"), ("low-rank", "rank=2.5", "rank"),
                                ("low-rank", "rank=-1", "rank"), ("low-rank", "energy=1.5", "energy"),
                                ("bitdelta", "per_row=1", "per_row")):
        code, _out, err = cli("--store", s, "diff", "ft", "--base", "base", "--codec", codec, "--param", param)
        assert code == 4 and named in err and "Traceback" not in err, (codec, param, code, err)
