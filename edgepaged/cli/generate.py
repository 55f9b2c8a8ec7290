"""`edgepaged generate`: one prompt, answered on stdout as it is generated."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import EdgepagedError, RequestError
from ..sampling import SamplingParams


def generate(
    prompt: str = typer.Argument(..., help="The prompt (or the user message, with --chat)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct, offline)."),
    profile: str = typer.Option("cpu", "--profile", "-p", help="Device profile name or YAML path."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Override the profile's attention backend (torch, triton)."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(-1, "--top-k", help="Sample among the k likeliest tokens (-1: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Above 1 discourages tokens already in the prompt or answer (1: off)."
    ),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the model's chat template (when it has one)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for --chat."),
) -> None:
    """Generate an answer to PROMPT and stream it to the terminal."""
    from ..engine import LLMEngine

    try:
        if not prompt.strip():
            raise RequestError("the prompt is empty")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            repetition_penalty=repetition_penalty,
        )
        engine = LLMEngine.from_model(model, profile, backend=backend)
        tokenizer = engine.tokenizer
        if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt_ids = engine.apply_chat_template(messages)
        else:
            prompt_ids = engine.encode(prompt)
        engine.add_request("cli", prompt_ids, params)
    except (EdgepagedError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    shown = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write("\n")
