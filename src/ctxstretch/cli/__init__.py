"""The `ctxstretch` command: a thin typer face over the Python API (`ctxstretch.extend`, `.evaluate`, …).
User errors print one line and exit 2 (`common.guarded`).

Every top-level command is listed here, in the order `ctxstretch --help` shows them; each lives in the module of its
topic, and the groups (`tiny`, `data`, `backend`) bring their own sub-apps. Nothing imports this package back."""

from __future__ import annotations

import typer

from . import data, evaluate, model, plan, run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extend the context window of a causal LM cheaply, and prove it worked.")
app.add_typer(model.tiny_app, name="tiny")
app.add_typer(data.data_app, name="data")
app.add_typer(model.backend_app, name="backend")

app.command("extend")(run.extend)
app.command("eval")(evaluate.eval_cmd)
app.command("check-parity")(evaluate.check_parity)
app.command("import")(model.import_gguf)
app.command("export-gguf")(model.export_gguf)
app.command("report")(evaluate.report)
app.command("train")(run.train)
app.command("compare")(run.compare)
app.command("plan")(plan.plan)
app.command("accelerate-config")(plan.accelerate_config)

__all__ = ["app"]
