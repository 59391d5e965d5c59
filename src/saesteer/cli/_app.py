"""The one typer application; each ``cli/<stage>.py`` adds its commands to it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="saesteer",
    help="Steer chat models to refuse harmful requests with SAE features, and measure what it costs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluations: refusal, multi-turn attacks, capability.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
