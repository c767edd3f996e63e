"""The toolkit's LoRA linear layers (finetune/kernels/lora_layers.py): peft's numbers, less work, peft's forward
elsewhere."""

from __future__ import annotations

import contextlib
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLinear

from finetune.kernels import lora_layers
from finetune.kernels.lora_layers import MergedWeightMatmul
from tests.conftest import load, lora_model
from tests.test_train import recipe_args

WIDTH = 32  # the merged weight is taken from as many tokens as a layer's narrower side


@pytest.fixture
def merged_calls(monkeypatch) -> list:
    """Each call that took the merged-weight path."""
    calls, apply = [], MergedWeightMatmul.apply
    monkeypatch.setattr(MergedWeightMatmul, "apply", lambda *args: calls.append(args) or apply(*args))
    return calls


def one_layer(bias: bool = True, **lora):
    """A peft LoRA layer around Linear(WIDTH, 2 * WIDTH), B non-zero (peft starts it at zero), in train mode."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH, bias=bias)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **lora))
    layer = model.base_model.model[0]
    for adapter in layer.lora_B:
        torch.nn.init.normal_(layer.lora_B[adapter].weight, std=0.1)
    return model.train(), layer


def output_and_grads(module, layer, x):
    """The output and the gradients of x and of every adapter weight, for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters() if p.requires_grad}


def with_peft_forward(layer, run):
    layer.__class__ = PeftLinear
    try:
        return run()
    finally:
        layer.__class__ = lora_layers.Linear


@pytest.mark.parametrize("bias, frozen, scale", [(True, None, None), (False, "lora_B", None), (True, None, 3.0)],
                         ids=["base-bias", "B-frozen", "set_scale"])
def test_merged_weight_layer_equals_peft(bias, frozen, scale, merged_calls):
    """fp32 training with enough tokens: the merged weight W + s*B@A; the output, the input's and the adapters'
    gradients equal to peft's up to fp32 rounding; 3-d input, with and without a base bias, one adapter matrix
    frozen, a scale changed after creation (peft's `set_scale`)."""
    model, layer = one_layer(bias=bias)
    assert lora_layers.speed_up(model) == 1 and isinstance(layer, PeftLinear)
    if frozen:
        getattr(layer, frozen)["default"].weight.requires_grad_(False)
    if scale:
        layer.set_scale("default", scale)
    x = torch.randn(2, WIDTH, WIDTH)  # 64 tokens
    out, grad_x, grads = output_and_grads(model, layer, x)
    assert len(merged_calls) == 1
    peft_out, peft_grad_x, peft_grads = with_peft_forward(layer, lambda: output_and_grads(model, layer, x))
    assert len(merged_calls) == 1
    torch.testing.assert_close(out, peft_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, peft_grad_x, rtol=1e-6, atol=1e-6)
    assert set(grads) == {"lora_A.default.weight", "lora_B.default.weight"} - {f"{frozen}.default.weight"}
    assert set(peft_grads) == set(grads)
    for name, grad in peft_grads.items():  # fp32 rounding, in the order of the scale's product
        assert grad.abs().sum() > 0
        assert (grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_model_loss_and_gradients_equal_peft(llama_dir, data_files, tmp_path, merged_calls):
    """The recipe's model (LoRA on every linear layer, no dropout): the loss to 1e-6 and every LoRA gradient to 1e-5
    of its size, against peft's own layers."""
    recipe = load(recipe_args("lora_bf16", llama_dir, data_files["alpaca"], tmp_path, lora_dropout=0.0,
                              dtype="float32"))
    model = lora_model(recipe, padding_free=False)
    layers = [module for module in model.modules() if isinstance(module, PeftLinear)]
    assert layers and all(type(layer) is lora_layers.Linear for layer in layers)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (4, 40))}  # 160 tokens: wider than the model
    batch["labels"] = batch["input_ids"].clone()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads()
    assert len(merged_calls) == len(layers)
    for layer in layers:
        layer.__class__ = PeftLinear
    peft_loss, peft_grads = loss_and_grads()
    assert loss == pytest.approx(peft_loss, rel=1e-6)
    for name, grad in peft_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def _few_tokens(model, layer, x, stack):
    return x[:, :2]


def _no_grad(model, layer, x, stack):
    stack.enter_context(torch.no_grad())
    return x


def _bf16_weights(model, layer, x, stack):
    model.to(torch.bfloat16)
    return x.to(torch.bfloat16)


def _autocast(model, layer, x, stack):
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return x


def _bf16_fp32_matmuls(model, layer, x, stack):
    torch.set_float32_matmul_precision("medium")  # oneDNN may then compute fp32 matmuls in bf16
    stack.callback(torch.set_float32_matmul_precision, "highest")
    return x


def _adapter_disabled(model, layer, x, stack):
    layer.enable_adapters(False)
    return x


def _merged_into_base(model, layer, x, stack):
    layer.merge()
    return x


def _hook_on_base(model, layer, x, stack):
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    return x


def _forward_hook_on_lora_A(model, layer, x, stack):
    layer.lora_A["default"].register_forward_hook(lambda module, args, out: None)
    return x


def _backward_hook_on_lora_B(model, layer, x, stack):
    layer.lora_B["default"].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return x


def _backward_pre_hook_on_lora_A(model, layer, x, stack):
    layer.lora_A["default"].register_full_backward_pre_hook(lambda module, grad_out: None)
    return x


def _offloaded_lora_B(model, layer, x, stack):
    layer.lora_B["default"]._hf_hook = object()  # accelerate's mark of a module it moves or gathers weights for
    return x


def _global_module_hook(model, layer, x, stack):
    stack.callback(torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None).remove)
    return x


def _forward_mode_ad(model, layer, x, stack):
    import torch.autograd.forward_ad as fwAD

    stack.enter_context(fwAD.dual_level())
    return fwAD.make_dual(x, torch.ones_like(x))


def _base_trains(model, layer, x, stack):
    layer.base_layer.weight.requires_grad_(True)
    return x


def _adapter_frozen(model, layer, x, stack):
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    return x


def _on_a_gpu(model, layer, x, stack):
    model.to("cuda")
    return x.to("cuda")


@pytest.mark.parametrize("case", [_few_tokens, _no_grad, _bf16_weights, _autocast, _bf16_fp32_matmuls,
                                  _adapter_disabled, _merged_into_base, _hook_on_base, _forward_hook_on_lora_A,
                                  _backward_hook_on_lora_B, _backward_pre_hook_on_lora_A, _offloaded_lora_B,
                                  _global_module_hook, _forward_mode_ad,
                                  _base_trains, _adapter_frozen,
                                  pytest.param(_on_a_gpu, marks=pytest.mark.skipif(
                                      not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
                         ids=lambda case: case.__name__.strip("_"))
def test_peft_forward_where_the_merged_weight_does_not_fit(case, merged_calls):
    """Too few tokens for the merge to pay, no gradient, matmuls that round fp32 (16-bit weights, autocast, bf16
    "fp32" matmuls: the merge would round the adapter's update away), adapters off or merged, a hook expecting its
    module called (offloading, ZeRO-3, backward hooks, module-wide tracers), forward-mode AD, a training base, a
    frozen adapter, a GPU (not measured there): peft's own forward, bit for bit."""
    model, layer = one_layer()
    lora_layers.speed_up(model)
    with contextlib.ExitStack() as stack:
        x = case(model, layer, torch.randn(2, WIDTH, WIDTH), stack)
        out = model(x)
        peft_out = with_peft_forward(layer, lambda: model(x))
        if case is _forward_mode_ad:
            import torch.autograd.forward_ad as fwAD

            out, peft_out = fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(peft_out).tangent
            assert out is not None
    assert merged_calls == []
    assert torch.equal(out, peft_out)


def test_peft_forward_under_torch_func(merged_calls):
    """torch.func transforms (grad, vmap) need rules the merged-weight Function lacks: peft's forward, the same
    gradient."""
    model, layer = one_layer()
    lora_layers.speed_up(model)
    x = torch.randn(2, WIDTH, WIDTH)  # enough tokens for the merged weight outside the transform

    def input_grad():
        return torch.func.grad(lambda t: model(t).square().sum())(x)

    grad = input_grad()
    assert merged_calls == []
    assert torch.equal(grad, with_peft_forward(layer, input_grad))


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.5}, {"use_dora": True}, {"lora_bias": True}],
                         ids=["dropout", "dora", "lora_bias"])
@pytest.mark.parametrize("added", [False, True], ids=["at-creation", "added-later"])
def test_adapters_that_keep_pefts_forward(lora, added, merged_calls):
    """With LoRA dropout the adapter sees another input than the base; DoRA and a LoRA bias add terms the merge
    leaves out: such an adapter runs peft's forward and keeps peft's input cast, also when it is added and made
    active after the layer was sped up (a second adapter, a resumed one)."""
    if added:
        model, layer = one_layer()
        lora_layers.speed_up(model)
        model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **lora))
        model.set_adapter("second")
        torch.nn.init.normal_(layer.lora_B["second"].weight, std=0.1)
    else:
        model, layer = one_layer(**lora)
        assert lora_layers.speed_up(model) == 1
    model.train()
    x = torch.randn(2, WIDTH, WIDTH)
    torch.manual_seed(2)
    out, grad_x, grads = output_and_grads(model, layer, x)
    torch.manual_seed(2)  # the same dropout mask
    peft_out, peft_grad_x, peft_grads = with_peft_forward(layer, lambda: output_and_grads(model, layer, x))
    assert merged_calls == []
    assert torch.equal(out, peft_out) and torch.equal(grad_x, peft_grad_x)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[n], g) for n, g in peft_grads.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._cast_input_dtype(x.bfloat16(), torch.float32).dtype == torch.float32


def test_merged_weight_layer_saves_merges_and_pickles_as_pefts(tmp_path):
    """The layer stays peft's: after a step trained through the merged weight, it saves the same adapter file as
    peft's class, merge_and_unload gives the same weights, torch.save works."""
    model, layer = one_layer()
    lora_layers.speed_up(model)
    output_and_grads(model, layer, torch.randn(2, WIDTH, WIDTH))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.save_pretrained(tmp_path / "toolkit")
    with_peft_forward(layer, lambda: model.save_pretrained(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "toolkit" / "adapter_model.safetensors").read_bytes()
    assert type(pickle.loads(pickle.dumps(layer))) is lora_layers.Linear
    x = torch.randn(WIDTH, WIDTH)
    with torch.no_grad():
        expected = with_peft_forward(layer, lambda: model(x))
        merged = model.merge_and_unload()
        assert type(merged[0]) is torch.nn.Linear
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)  # merged by peft: fp32 rounding


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_lora_input_cast_is_skipped_under_autocast_with_equal_results(device, llama_dir, data_files, tmp_path):
    """Under autocast (mixed-precision training) a plain LoRA layer without dropout takes its 16-bit input as it is,
    instead of peft's fp32 copy that autocast casts straight back: the loss and every gradient equal peft's own path
    bit for bit. Without autocast, or under autocast to another dtype, peft's cast stays."""
    recipe = load(recipe_args("lora_bf16", llama_dir, data_files["alpaca"], tmp_path, lora_dropout=0.0))
    model = lora_model(recipe, padding_free=False).to(device)
    layers = [module for module in model.modules() if isinstance(module, PeftLinear)]
    assert layers and all(type(layer) is lora_layers.Linear for layer in layers)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 24), device=device)}
    batch["labels"] = batch["input_ids"].clone()

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    x = torch.ones(3, 4, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert layers[0]._cast_input_dtype(x, torch.float32) is x  # no copy
    with torch.autocast(device, dtype=torch.float16):
        assert layers[0]._cast_input_dtype(x, torch.float32).dtype == torch.float32  # autocast to another dtype
    assert layers[0]._cast_input_dtype(x, torch.float32).dtype == torch.float32  # no autocast: peft's cast
    fast_loss, fast_grads = loss_and_grads()
    for layer in layers:
        layer.__class__ = PeftLinear  # peft's own cast again
    peft_loss, peft_grads = loss_and_grads()
    assert torch.equal(fast_loss, peft_loss)
    assert any(g.abs().sum() > 0 for g in peft_grads.values())
    for name, grad in peft_grads.items():
        assert torch.equal(fast_grads[name], grad), name
