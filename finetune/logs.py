"""Console logging: the toolkit's own lines, and third-party lines that look like failures but are not.

Each filtered message is named below with the reason it is safe to drop. Everything else passes.
"""

from __future__ import annotations

import logging

# (logger name, start of the message, why dropping it is safe)
EXPECTED_NOISE = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "printed at import on CPUs with AVX512-BF16 when the optional `kernels` package is missing; the kernel it "
     "names serves only bitsandbytes' packed 4-bit inference path, which training never takes "
     "(model.keep_4bit_cpu_path_exact) and which falls back to bitsandbytes' own CPU kernel"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from",
     "printed on every int8 forward in eval mode: LLM.int8 quantizes activations from float16 by design, so the "
     "cast is the algorithm, not a loss of the recipe's precision (training on CPU dequantizes instead)"),
]


EXPECTED_NOISE += [
    ("lm_eval.models.huggingface", message,
     "finetune eval hands the harness the model it loaded as trained (quantized base plus adapter), in one process, "
     "on purpose; the harness warns whenever `pretrained` is not a name")
    for message in ("`pretrained` model kwarg is not of type `str`",
                    "Passed an already-initialized model through `pretrained`")]

# (warning category, start of the message, why ignoring it is safe)
EXPECTED_WARNINGS = [
    (FutureWarning, "`is_gradient_checkpointing` is deprecated",
     "peft reads transformers' deprecated alias when it wraps a model; the alias still answers correctly"),
]


class _DropExpected(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party() -> None:
    """Drop the EXPECTED_NOISE log lines at their source loggers and the EXPECTED_WARNINGS (idempotent; works
    before those libraries load)."""
    import re
    import warnings

    for category, prefix, _ in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    for name, prefix, _ in EXPECTED_NOISE:
        source = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) and f.prefix == prefix for f in source.filters):
            source.addFilter(_DropExpected(prefix))
    # transformers prints "[INFO] Running in WANDB offline mode" (a bare print, not a log line) when its W&B
    # integration is first imported under WANDB_MODE=offline; the toolkit says where an offline run goes itself.
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import transformers.integrations.integration_utils  # noqa: F401


VERBOSE = "FINETUNE_VERBOSE"  # set (to 1) by --verbose: every library's lines, unfiltered, and W&B's own


def verbose() -> bool:
    import os

    return os.environ.get(VERBOSE, "") not in ("", "0", "false")


def take_verbose(argv: list[str]) -> list[str]:
    """`argv` without `--verbose`; when it was there, verbose() is true here and in every process started after."""
    import os

    if "--verbose" in argv:
        os.environ[VERBOSE] = "1"
    return [token for token in argv if token != "--verbose"]


def setup(is_main_process: bool = True) -> None:
    """The toolkit's log format; INFO on the main process, warnings only elsewhere. With verbose(), nothing is
    filtered and transformers logs at INFO."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if is_main_process else logging.WARNING)
    import transformers

    if verbose():
        transformers.logging.set_verbosity_info()
        return
    quiet_third_party()

    transformers.logging.set_verbosity_warning() if is_main_process else transformers.logging.set_verbosity_error()
