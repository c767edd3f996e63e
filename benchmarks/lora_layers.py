"""The toolkit's LoRA linear layers and RMSNorm against peft's and transformers', forward and backward, in one
process and interleaved.

    make bench-lora                       # python benchmarks/lora_layers.py
    python benchmarks/lora_layers.py --rounds 9 --widths 512 2048

Three measurements, fp32 on this machine's device:
- one layer (peft's `Linear` around an `nn.Linear`, rank 16) per width and number of tokens: the merged-weight
  layer's time over peft's, each the fastest of the rounds, and which one the toolkit takes there (from as many
  tokens as the layer is wide);
- `make bench-train`'s CPU model (4 layers, 512 wide, LoRA r16 on every linear layer), 8 examples of 175 tokens:
  forward and backward with the toolkit's layers and with peft's, the loss and the largest gradient gap;
- one RMSNorm at that model's width (finetune/kernels/norms.py against transformers'), per number of tokens.

Both arms run in the same process on the same tensors, round by round, so a busy machine shows as spread between
rounds (min and median are printed) rather than as a difference between arms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_speed  # noqa: E402  (its sys.path entry: this checkout's toolkit, not an installed one)


def timed(arms: dict, rounds: int, calls: int) -> dict:
    """Seconds per call of each arm: every round runs each arm `calls` times, arms interleaved."""
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, run in arms.items():
            run()  # warm-up: allocator, thread pool
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def layer_step(layer, merged: bool, x, grad) -> None:
    """Forward and backward of one LoRA layer: peft's forward, or the merged weight's whatever the token rule says.
    Both without `Module.__call__`, which neither arm needs here."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    out = layer.merged_weight_forward(x, "default") if merged else PeftLinear.forward(layer, x)
    out.backward(grad)


def one_layer(widths: list[int], token_counts: list[int], rounds: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.kernels import lora_layers

    rank = 16
    print(f"one layer, rank {rank}: merged-weight time / peft's (fastest of {rounds} rounds)")
    print(f"{'width':>6} {'tokens':>7} {'ratio':>6}  toolkit takes")
    for width in widths:
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(width, width)),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
        layer = model.base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        lora_layers.speed_up(model)
        for tokens in token_counts:
            x = torch.randn(tokens, width, requires_grad=True)
            grad = torch.randn(tokens, width)

            times = timed({"peft": partial(layer_step, layer, False, x, grad),
                           "merged": partial(layer_step, layer, True, x, grad)}, rounds, calls=5)
            takes = "merged" if layer._merged_weight_adapter(x) else "peft's"
            print(f"{width:>6} {tokens:>7} {min(times['merged']) / min(times['peft']):>6.2f}  {takes}")


def whole_model(rounds: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as PeftLinear
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.kernels import lora_layers

    shape = train_speed.SIZES["cpu"]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"])
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**train_speed.LORA))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained adapters, not zeros, so the two paths' numbers can differ
            torch.nn.init.normal_(parameter, std=0.02)
    layers = [module for module in model.modules() if isinstance(module, PeftLinear)]
    lora_layers.speed_up(model)
    ids = torch.randint(0, config.vocab_size, (shape["batch"], 175))  # 175: the texts' mean length
    results, merged_calls, apply = {}, [], lora_layers.MergedWeightMatmul.apply
    lora_layers.MergedWeightMatmul.apply = lambda *args: merged_calls.append(1) or apply(*args)

    def step(kind):
        for layer in layers:
            layer.__class__ = kind
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[kind] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    step(lora_layers.Linear)
    print(f"\n{len(merged_calls)} of {len(layers)} LoRA layers took the merged weight in a forward")
    times = timed({"peft": lambda: step(PeftLinear), "toolkit": lambda: step(lora_layers.Linear)}, rounds, calls=2)
    (peft_loss, peft_grads), (loss, grads) = results[PeftLinear], results[lora_layers.Linear]
    gap = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in peft_grads.items())
    print(f"make bench-train's CPU model, 8 x 175 tokens, forward + backward ({rounds} rounds):")
    for name, values in times.items():
        print(f"  {name:8} min {min(values):.3f} s   median {statistics.median(values):.3f} s")
    print(f"  toolkit / peft: min {min(times['toolkit']) / min(times['peft']):.2f}, "
          f"median {statistics.median(times['toolkit']) / statistics.median(times['peft']):.2f}")
    print(f"  loss {loss:.7f} vs peft's {peft_loss:.7f}; largest gradient gap {gap:.1e} of the gradient's size")


def norm_step(norm, x, grad) -> None:
    norm(x).backward(grad)


def one_norm(token_counts: list[int], rounds: int) -> None:
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from finetune.kernels import norms

    width = train_speed.SIZES["cpu"]["hidden"]
    reference, ours = LlamaRMSNorm(width), LlamaRMSNorm(width)
    for norm in (reference, ours):
        norm.weight.requires_grad_(False)  # frozen, as under LoRA
    norms.speed_up(torch.nn.Sequential(ours))
    print(f"\none RMSNorm, {width} wide, forward + backward: the toolkit's time / transformers' "
          f"(fastest of {rounds} rounds)")
    print(f"{'tokens':>7} {'ratio':>6}")
    for tokens in token_counts:
        x, grad = torch.randn(tokens, width, requires_grad=True), torch.randn(tokens, width)
        times = timed({"transformers": partial(norm_step, reference, x, grad),
                       "toolkit": partial(norm_step, ours, x, grad)}, rounds, calls=5)
        print(f"{tokens:>7} {min(times['toolkit']) / min(times['transformers']):>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 896, 2048])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft on transformers 5: a deprecation, not ours
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    one_layer(args.widths, args.tokens, args.rounds)
    whole_model(args.rounds)
    one_norm(args.tokens, args.rounds)


if __name__ == "__main__":
    main()
