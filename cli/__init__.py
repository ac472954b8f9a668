"""The ``tsllm`` command line: a thin front door over the tensorstore_llm Python API.

Command modules import only click at load time, so ``tsllm --help`` answers without torch.
Every TsllmError becomes one ``error:`` line on stderr and the error's exit code.
"""
from __future__ import annotations

import os
import sys

import click

from tensorstore_llm.errors import TsllmError

_COMMANDS = {
    "import": ("store_cmds", "import_cmd"),
    "export": ("store_cmds", "export_cmd"),
    "ls": ("store_cmds", "ls_cmd"),
    "show": ("store_cmds", "show_cmd"),
    "log": ("store_cmds", "log_cmd"),
    "tag": ("store_cmds", "tag_cmd"),
    "verify": ("store_cmds", "verify_cmd"),
    "gc": ("store_cmds", "gc_cmd"),
    "convert": ("run_cmds", "convert_cmd"),
    "weighted-sum": ("run_cmds", "weighted_sum_cmd"),
    "merge": ("merge_cmds", "merge_cmd"),
    "soup": ("merge_cmds", "soup_cmd"),
    "ops": ("run_cmds", "ops_cmd"),
    "lora": ("lora_cmds", "lora_group"),
    "quickstart": ("quickstart_cmd", "quickstart_cmd"),
    "logits": ("distill_cmds", "logits_group"),
    "prune": ("prune_cmds", "prune_cmd"),
    "loram": ("prune_cmds", "loram_group"),
    "plan": ("prune_cmds", "plan_cmd"),
    "diff": ("diff_cmds", "diff_cmd"),
    "apply": ("diff_cmds", "apply_cmd"),
    "diff-stats": ("diff_stats_cmds", "diff_stats_cmd"),
    "diff-eval": ("diff_stats_cmds", "diff_eval_cmd"),
}


class _Commands(click.Group):
    def list_commands(self, ctx):
        return list(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        import importlib

        module, attr = _COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "store_root", envvar="TSLLM_STORE", default=None, metavar="DIR",
              help="Store directory (default: $TSLLM_STORE or ./tsllm-store).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or chatter; errors still go to stderr.")
@click.version_option(package_name="tensorstore-llm", prog_name="tsllm")
@click.pass_context
def cli(ctx, store_root, quiet):
    """tensorstore_llm: keep LLM checkpoints as artifacts and stream work over them.

    \b
    Typical session:
      tsllm import ./Llama-3-8B --name base      # HF dir, .safetensors file or org/name hub repo
      tsllm convert base --dtype fp16 --name base-fp16 --max-memory 1G
      tsllm weighted-sum ft1 ft2 --weights 0.5,0.5 --name soup
      tsllm merge ties.yaml --name merged --max-memory 4G   # mergekit recipes
      tsllm lora merge base ./my-adapter --name merged      # PEFT LoRA / DoRA, streamed
      tsllm logits precompute --teacher ./SmolLM2-135M --data corpus.jsonl --name kd   # RS-KD
      tsllm export soup ./soup-hf --max-shard-size 5G
      tsllm ls; tsllm show soup; tsllm log soup; tsllm verify soup

    Streamed commands hold at most --max-memory of tensor data, resume when re-run after an
    interruption, and accept --dry-run to print the plan and the memory it needs.
    Run `tsllm quickstart` for an offline end-to-end demo.
    """
    ctx.obj = {"store": store_root, "quiet": quiet}


def _tune_process() -> None:
    """Settings for a short-lived, throughput-bound process, made before torch is imported.

    OpenMP workers that spin while idle (libgomp's default) take cores from the reader and writer
    threads of the pipeline (measured: 1 s of 8 s of CPU in a 3 x 1 GB merge on 2 cores), so they
    sleep instead unless the user set OMP_WAIT_POLICY. Importing torch allocates ~1M long-lived
    objects; a larger first-generation threshold spares it ~100 full collections (0.1 s).
    """
    import gc

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    gc.set_threshold(100_000, 50, 100)


def main(argv=None) -> None:
    """Entry point of the ``tsllm`` console script."""
    _tune_process()
    try:
        code = cli.main(args=argv, prog_name="tsllm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TsllmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume where it stopped", err=True)
        sys.exit(130)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if os.environ.get("TSLLM_DEBUG"):
        click.echo(f"exit {code}", err=True)
    sys.exit(code if isinstance(code, int) else 0)


_ALLOCATOR_TUNABLES = "glibc.malloc.tcache_count=0"


def _restart_with_allocator_tunables() -> None:
    """Restart this process once (before torch is imported) with glibc's per-thread malloc cache
    off, so that ``--max-memory`` holds.

    Small chunks a tile worker frees stay in its thread cache, i.e. in use for its arena, and pin
    the 2 MiB tile temporaries around them apart: the arena can neither coalesce nor trim that
    free space. Measured on TIES at --max-memory 128M (docs/benchmarks.md, "Honest budget"):
    ~100 MiB of free, resident heap and a peak of 430-545 MiB from run to run with the cache,
    392 MiB every time without it, at the same CPU time. glibc reads the setting only at start-up.
    A GLIBC_TUNABLES the user set is left alone; so are other C libraries.
    """
    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux") or not sys.executable:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (ValueError, OSError, AttributeError):
        return
    if any(a in ("--help", "-h", "--version") for a in sys.argv[1:]) or len(sys.argv) < 2:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tensorstore_llm_cli", *sys.argv[1:]],
              dict(os.environ, GLIBC_TUNABLES=_ALLOCATOR_TUNABLES))


def run() -> None:
    """Console-script entry: ``main()``, then exit without tearing the interpreter down.

    Unloading torch and freeing its objects at exit takes ~0.4 s and does nothing for the user:
    every output was written, synced and closed before ``main`` returned.
    """
    _restart_with_allocator_tunables()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
