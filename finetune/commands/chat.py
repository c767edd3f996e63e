"""Talk to a trained model: `finetune chat`.

    finetune chat outputs/tiny                          # interactive: type a message, the answer streams back
    finetune chat outputs/tiny --prompt "What is 2+2?"  # one answer on stdout, for scripts
    finetune chat outputs/tiny-merged                   # a merged model directory (finetune merge) works too

A training run is loaded as it was trained (the base with the same quantization plus the adapter, or the full
model); the tokenizer's chat template is applied when it has one, so the model sees its prompts the way it saw
them in training. Greedy by default (`--temperature` above 0 samples). In the interactive mode the conversation is
kept turn after turn; `/reset` starts over, `/exit` or Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune import errors
from finetune.errors import UsageError
from finetune.training import rundir


def kind_problem(directory: Path) -> str | None:
    """Why `directory` is neither a training run nor a model directory, or None; answered before anything loads."""
    if (directory / rundir.RECIPE).is_file() or (directory / "config.json").is_file():
        return None
    return (f"{directory}: neither a training run (no {rundir.RECIPE}) nor a model directory (no config.json); "
            "pass a run's output_dir or a merged model's directory")


def load(directory: Path):
    """(tokenizer, model) of a finished training run or of a model directory (a merged model)."""
    if (directory / rundir.RECIPE).is_file():
        from finetune.training.rundir import load_for_inference

        _, tokenizer, model = load_for_inference(directory)
        return tokenizer, model
    problem = kind_problem(directory)
    if problem:
        raise UsageError(problem)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory).eval()


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the model saw conversations in training: its chat template with the assistant's turn
    opened, or (no template) the last message as plain text."""
    if tokenizer.chat_template:
        from jinja2 import TemplateError

        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
        except TemplateError as error:  # e.g. a template that has no system role
            raise UsageError(f"the model's chat template refuses this conversation: {error}") from None
    return tokenizer(messages[-1]["content"])["input_ids"]


def answer(tokenizer, model, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
           stream: bool) -> str:
    """Generate the assistant's answer to `messages`; printed token by token as it comes when `stream`."""
    import torch
    from transformers import TextStreamer

    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def interactive(tokenizer, model, system: str | None, max_new_tokens: int, temperature: float) -> None:
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print("type a message; /reset starts over, /exit or Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(tokenizer, model, messages, max_new_tokens, temperature, stream=True)
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    from finetune import logs

    parser = argparse.ArgumentParser(prog="finetune chat", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a finished run's output_dir, or a merged model directory")
    parser.add_argument("--prompt", help="answer this one message and exit (stdout: the answer only)")
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0:
            raise UsageError("--max_new_tokens must be at least 1 and --temperature at least 0")
        problem = kind_problem(args.directory)
        if problem:
            raise UsageError(problem)
        logs.setup()
        tokenizer, model = load(args.directory)
        if args.prompt is not None:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": args.prompt}]
            print(answer(tokenizer, model, messages, args.max_new_tokens, args.temperature, stream=False))
        else:
            interactive(tokenizer, model, args.system, args.max_new_tokens, args.temperature)
    except UsageError as error:
        return errors.report(error)
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
