"""`edgepaged generate`: one prompt, answered on stdout as it is generated.

The engine's KV pool holds this one request (prompt plus --max-tokens), not the profile's
whole budget: the prompt is tokenized first, with the model's own tokenizer, to know its size.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import EdgepagedError, RequestError
from .streaming import stream_local, write_stdout


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
    from ..llm import engine_for_job
    from ..models.loader import load_tokenizer, resolve_model
    from ..sampling import SamplingParams

    try:
        if not prompt.strip():
            raise RequestError("the prompt is empty")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            repetition_penalty=repetition_penalty,
        )
        tokenizer = load_tokenizer(resolve_model(model))
        if tokenizer is None:
            raise RequestError("this model folder has no tokenizer; `edgepaged generate` takes text prompts")
        templated = chat and bool(getattr(tokenizer, "chat_template", None))
        if templated:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            # As the engine renders chat prompts: role tokens typed in the prompt stay text.
            prompt_ids = list(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
            ))
        else:
            prompt_ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
        engine = engine_for_job(model, profile, max_request_tokens=len(prompt_ids) + max_tokens, backend=backend)
        final = stream_local(engine, "cli", prompt_ids, params, write_stdout)
    except (EdgepagedError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    sys.stdout.write("\n")
    if not templated and _ended_at_once(final.token_ids, engine.eos_token_ids):
        typer.echo(
            "note: the model's first token was end-of-sequence, so the answer is empty; a raw prompt "
            "(--no-chat) works best as text to continue, e.g. 'The capital of France is'",
            err=True,
        )


def _ended_at_once(token_ids: list[int], eos_token_ids: frozenset[int]) -> bool:
    return len(token_ids) == 1 and token_ids[0] in eos_token_ids
