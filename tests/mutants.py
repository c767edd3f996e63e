"""Mutation check: the test suite catches the regressions it was written against.

Each entry of MUTANTS puts one known regression back into the code (an exact snippet of a file replaced by its
mutation) and names the tests that must then fail. For each mutant this script copies the repository's tracked files
into a throwaway directory, applies the mutation there and runs those tests with pytest; the repository itself is
never changed. Results, one line per mutant:

- CAUGHT: pytest exited 1 (some test failed), the line names the first failing test;
- MISSED: pytest exited 0, the tests pass with the regression in: the suite has a hole;
- STALE: the snippet no longer occurs exactly once in its file: the code changed, update the table;
- ERROR: any other exit (a collection error, a timeout): the tail of pytest's output is printed.

    .venv/bin/python tests/mutants.py                          # every mutant (10-15 minutes on 2 cores)
    .venv/bin/python tests/mutants.py --only norm-no-correction lora-dropout-guard
    .venv/bin/python tests/mutants.py --list                   # the table: name, file, tests
    .venv/bin/python tests/mutants.py --baseline               # first, each set of tests passes unmutated

It exits 0 only when every mutant run is CAUGHT (and, with --baseline, every baseline passes).

In the copy, `.venv` (and `assets/`, the embedded models) are links to the repository's. The venv holds the repository
as an editable install, which a process started outside the copy would import instead of the copy's package (tests
start training processes from their tmp_path), so PYTHONPATH is set to the copy; `check_isolation` verifies that
`import finetune` gives the copy's package from inside the copy and from elsewhere before any test runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
SHARED = (".venv", "assets")  # linked into the copy, not copied
TIMEOUT = 900  # seconds per pytest run; every mutant's tests take well under that


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or test files that must fail with the mutation in


KBIT = "tests/test_kbit.py::"
METRICS = "tests/test_metrics.py::"
EXPORT = "tests/test_export.py::"
PREFERENCE = "tests/test_preference.py::"
SWEEP = "tests/test_sweep.py::"
CHAT = "tests/test_chat_templates.py::test_loss_bearing_text_on_each_family"
CHUNKED = "tests/test_chunked_loss.py::test_chunked_loss_and_gradients_equal_transformers"
NORMS = ("tests/test_norms.py::test_equal_to_transformers",
         "tests/test_norms.py::test_transformers_forward_where_it_does_not_apply",
         "tests/test_norms.py::test_a_second_derivative_is_refused_with_torchs_error")
LORA = ("tests/test_lora_layers.py::test_merged_weight_layer_equals_peft",
        "tests/test_lora_layers.py::test_peft_forward_where_the_merged_weight_does_not_fit",
        "tests/test_lora_layers.py::test_peft_forward_under_torch_func",
        "tests/test_lora_layers.py::test_adapters_that_keep_pefts_forward")
ACCUMULATION = (METRICS + "test_total_tokens_match_the_data_under_gradient_accumulation",
                METRICS + "test_totals_do_not_depend_on_how_a_step_is_split")
GGUF_REFUSED = "tests/test_gguf.py::test_unreadable_gguf_is_refused_in_one_line_before_anything_is_written"
BAD_INPUT = ("tests/test_bad_input.py::test_bad_data_is_one_line_naming_the_file_and_row",
             "tests/test_bad_input.py::test_bad_settings_are_one_line_naming_the_key")
SLURM_REQUEUE = "tests/test_slurm.py::test_the_time_limit_warning_checkpoints_requeues_and_resumes"

MUTANTS = [
    # bitsandbytes' packed 4-bit CPU path (AVX512-BF16): no backward, bf16 results.
    Mutant("kbit-packed-path-left-on", "finetune/model/load.py",
           "setattr(layer, PACKED_CPU_SWITCH, getattr(layer, PACKED_CPU_SWITCH) and allow_packed)",
           "setattr(layer, PACKED_CPU_SWITCH, getattr(layer, PACKED_CPU_SWITCH))",
           (KBIT + "test_only_bf16_inference_may_take_the_packed_kernel",
            KBIT + "test_after_an_eval_gradients_reach_the_lora_weights_through_every_4bit_layer")),
    Mutant("kbit-packed-path-for-fp32-inference", "finetune/model/load.py",
           'bf16_inference = not for_training and dtype == "bfloat16"',
           "bf16_inference = not for_training",
           (KBIT + "test_only_bf16_inference_may_take_the_packed_kernel",)),

    # The training clock stops for evaluations and checkpoints.
    Mutant("clock-runs-through-evaluation", "finetune/training/metrics.py",
           'for name, due in (("evaluate", control.should_evaluate), ("save", control.should_save)) if due}',
           'for name, due in (("save", control.should_save),) if due}',
           (METRICS + "test_training_clock_stops_for_evaluations_and_saves_and_continues",)),
    Mutant("clock-runs-through-checkpoint", "finetune/training/metrics.py",
           'for name, due in (("evaluate", control.should_evaluate), ("save", control.should_save)) if due}',
           'for name, due in (("evaluate", control.should_evaluate),) if due}',
           (METRICS + "test_training_clock_stops_for_evaluations_and_saves_and_continues",)),

    # A resumed run refuses settings it cannot change.
    Mutant("resume-learning-rate-changeable", "finetune/training/rundir.py",
           '"gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",',
           '"gradient_accumulation_steps", "lr_scheduler_type",',
           ("tests/test_run_safety.py::test_resume_refuses_settings_it_cannot_change_and_applies_the_others",)),

    # Answer-only labels on real chat templates.
    Mutant("labels-on-user-turns", "finetune/data/chat_templates.py",
           'if message["role"] != "assistant":\n            continue',
           'if message["role"] == "system":\n            continue',
           (CHAT, "tests/test_data.py::test_messages_labels_cover_every_assistant_turn_only")),
    Mutant("labels-without-end-of-turn", "finetune/data/chat_templates.py",
           "end = _common_prefix(through, text)",
           'end = start + len(message["content"])',
           (CHAT,)),
    Mutant("labels-drop-straddling-token", "finetune/data/load.py",
           "token_start < end and start < token_end <= end",
           "start <= token_start and token_end <= end",
           (CHAT,)),

    # The launcher passes SIGTERM/SIGINT/SIGUSR1 on to the training processes.
    Mutant("launcher-signals-accelerate-not-workers", "finetune/commands/launch.py",
           "targets = descendants(process)",
           "targets = [process]",
           ("tests/test_run_safety.py::test_a_signal_to_the_launcher_checkpoints_and_the_rerun_resumes_to_the_same_"
            "weights[launch/train.sh-SIGTERM]",)),

    # The chunked loss equals transformers' loss and gradients.
    Mutant("chunked-loss-ignores-num-items", "finetune/kernels/chunked_loss.py",
           "return total / num_items_in_batch",
           "return total / keep.numel()",
           (CHUNKED,)),
    Mutant("chunked-loss-backward-unscaled", "finetune/kernels/chunked_loss.py",
           "grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]",
           "grads = list(ctx.grads)",
           (CHUNKED,)),

    # RMSNorm's written-out backward and the guards on where it applies.
    Mutant("norm-no-correction", "finetune/kernels/norms.py",
           "grad_x = grad_normed.mul_(rstd).sub_(x * correction)",
           "grad_x = grad_normed.mul_(rstd)",
           NORMS),
    Mutant("norm-weight-grad-unnormalised", "finetune/kernels/norms.py",
           "grad_weight = (grad * (x * rstd)).reshape(-1, x.shape[-1]).sum(0)",
           "grad_weight = (grad * x).reshape(-1, x.shape[-1]).sum(0)",
           NORMS),
    Mutant("norm-not-once-differentiable", "finetune/kernels/norms.py",
           "    @torch.autograd.function.once_differentiable\n",
           "",
           NORMS),
    Mutant("norm-dtype-guards", "finetune/kernels/norms.py",
           "hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()",
           "torch.is_grad_enabled()",
           NORMS),
    Mutant("norm-weight-dtype-guard", "finetune/kernels/norms.py",
           "hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()",
           "hidden_states.dtype == torch.float32 and torch.is_grad_enabled()",
           NORMS),
    Mutant("norm-input-dtype-guard", "finetune/kernels/norms.py",
           "hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()",
           "self.weight.dtype == torch.float32 and torch.is_grad_enabled()",
           NORMS),
    Mutant("norm-grad-enabled-guard", "finetune/kernels/norms.py",
           "hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()",
           "hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32",
           NORMS),

    # The merged-weight LoRA layer: peft's numbers, and peft's forward wherever the merge does not fit.
    Mutant("lora-A-grad-unscaled", "finetune/kernels/lora_layers.py",
           "            grad_A.mul_(scaling)\n",
           "",
           LORA),
    Mutant("lora-dropout-guard", "finetune/kernels/lora_layers.py",
           "self.lora_bias.get(adapter)\n"
           "                or not isinstance(self.lora_dropout[adapter], torch.nn.Identity)):",
           "self.lora_bias.get(adapter)):",
           LORA),
    Mutant("lora-merged-guard", "finetune/kernels/lora_layers.py",
           "if self.disable_adapters or self.merged or len(self.active_adapters) != 1:",
           "if self.disable_adapters or len(self.active_adapters) != 1:",
           LORA),
    Mutant("lora-transform-guard", "finetune/kernels/lora_layers.py",
           "        if transformed(x):  # forward-mode AD or torch.func: no jvp or vmap rule here\n"
           "            return None\n",
           "",
           LORA),

    # Padding-free batches: each example attends only to itself.
    Mutant("padding-free-one-slice-for-the-row", "finetune/data/padding_free.py",
           "lengths = sequence_lengths(cu_seq_lens)",
           "lengths = [query.shape[2]]",
           ("tests/test_padding_free.py::test_flattened_batch_equals_padded_batch_and_per_example_truth",)),
    Mutant("padding-free-no-position-ids", "finetune/data/padding_free.py",
           "DataCollatorWithFlattening(return_position_ids=True,",
           "DataCollatorWithFlattening(return_position_ids=False,",
           ("tests/test_padding_free.py::test_flattened_batch_equals_padded_batch_and_per_example_truth",)),

    # Gradient accumulation: the loss over the whole step's tokens, every micro-batch counted.
    Mutant("accumulation-loss-ignores-num-items", "finetune/training/trainer.py",
           "loss = super().training_step(model, inputs, num_items_in_batch)",
           "loss = super().training_step(model, inputs)",
           ACCUMULATION),
    Mutant("accumulation-counts-last-micro-batch", "finetune/training/metrics.py",
           "self.interval = self.interval.plus((*counts, 0))",
           "self.interval = Totals(*counts, 0)",
           ACCUMULATION),
    Mutant("accumulation-loss-sum-last-micro-batch", "finetune/training/metrics.py",
           "self.interval_loss = loss if self.interval_loss is None else self.interval_loss + loss",
           "self.interval_loss = loss",
           ACCUMULATION),

    # A GGUF file transformers can't train is refused in one line.
    Mutant("gguf-non-causal-architecture", "finetune/model/gguf.py",
           "if model_type not in GGUF_SUPPORTED_ARCHITECTURES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:",
           "if model_type not in GGUF_SUPPORTED_ARCHITECTURES:",
           (GGUF_REFUSED + "[bert-run.py]", GGUF_REFUSED + "[t5-not-causal-run.py]")),
    Mutant("gguf-undequantizable-tensor-type", "finetune/model/gguf.py",
           "unreadable = [name for name in info.tensor_types if not _dequantizes(name)]",
           "unreadable = []",
           (GGUF_REFUSED + "[llama-q8_1-run.py]",)),

    # dtype: auto is fp32 on a CPU without native bf16.
    Mutant("auto-dtype-bf16-on-any-cpu", "finetune/model/load.py",
           'return "float32", "the CPU has no native bf16',
           'return "bfloat16", "the CPU has no native bf16',
           ("tests/test_gguf.py::test_auto_picks_bf16_only_where_it_is_native",
            "tests/test_gguf.py::test_the_choice_is_logged_and_emulated_bf16_warned")),

    # A run resumed from the checkpoint of its last step takes no step more.
    Mutant("resume-past-max-steps", "finetune/training/trainer.py",
           "if 0 < self.state.max_steps <= self.state.global_step:", "if False:",
           ("tests/test_run_safety.py::"
            "test_a_run_stopped_after_its_last_checkpoint_resumes_to_the_same_end_not_a_step_past_it",)),
    # A second Ctrl-C to the launcher: at once, said, 130.
    Mutant("second-ctrl-c-exit-code", "finetune/commands/launch.py",
           "            return 128 + signal.SIGINT\n", "            pass\n",
           ("tests/test_run_safety.py::test_a_second_ctrl_c_to_the_launcher_stops_everything_at_once_with_130",)),
    # An overwrite keeps the old run until the new one has a checkpoint; a run never writes over files it didn't.
    Mutant("overwrite-no-restore", "finetune/training/resilience.py",
           "            rundir.restore_previous_run(self.output_dir)\n", "",
           ("tests/test_run_safety.py::test_an_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint",)),
    Mutant("overwrite-over-foreign-files", "finetune/training/rundir.py",
           "    if clashing:\n", "    if False:\n",
           ("tests/test_run_safety.py::test_overwrite_output_dir_writes_beside_other_files_never_over_them",)),
    # Resume notices a dataset replaced in place.
    Mutant("resume-ignores-dataset-content", "finetune/training/rundir.py",
           "    if trained_on and \"dataset\" not in changed", "    if False and \"dataset\" not in changed",
           ("tests/test_run_safety.py::test_resume_refuses_a_dataset_replaced_in_place",)),
    # The output directory's refusals come before torch loads.
    Mutant("directory-checks-after-torch", "finetune/run.py",
           "        rundir.check_output_dir(values)", "        pass",
           ("tests/test_run_safety.py::test_a_run_that_would_be_refused_is_refused_before_torch_loads",)),
    # A full disk is one line and exit code 74.
    Mutant("disk-full-traceback", "finetune/training/resilience.py",
           "        if not disk_full(error, output_dir):\n            raise\n", "        raise\n",
           ("tests/test_run_safety.py::test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_resumes",)),
    # A finished run's follow-up commands need neither its working directory nor its data.
    Mutant("recipe-paths-relative", "finetune/run.py",
           "recipe_text = recipe_yaml(recipe, absolute=True)", "recipe_text = recipe_yaml(recipe)",
           ("tests/test_bench.py::test_a_finished_run_is_served_from_anywhere_without_its_training_data",)),
    # launch/slurm.sbatch: the time-limit warning reaches the training processes, and a checkpointed job requeues.
    Mutant("slurm-usr1-not-forwarded", "launch/slurm.sbatch",
           '  scancel --signal=USR1 "$SLURM_JOB_ID"', "  :",
           (SLURM_REQUEUE,)),
    Mutant("slurm-no-requeue-after-checkpoint", "launch/slurm.sbatch",
           '  scontrol requeue "$SLURM_JOB_ID"\n', "  :\n",
           (SLURM_REQUEUE,)),
    # Bad input: one line per problem, exit code 2, no traceback.
    Mutant("bad-input-traceback", "finetune/run.py",
           "    except UsageError as error:\n        code = errors.report(error)\n",
           "    except UsageError:\n        raise\n",
           BAD_INPUT),
    Mutant("bad-input-exit-code", "finetune/errors.py",
           'print(f"error: {problem}", file=sys.stderr)\n    return USAGE',
           'print(f"error: {problem}", file=sys.stderr)\n    return 1',
           BAD_INPUT),

    # GGUF export: what transformers' reader (and llama.cpp) expect.
    Mutant("gguf-no-qk-permutation", "finetune/model/gguf.py",
           'data = llama_permute(data, heads if "q_proj" in key else kv_heads)', "data = data",
           (EXPORT + "test_the_merged_adapter_is_in_the_file[llama]",)),
    Mutant("gguf-special-tokens-as-normal", "finetune/model/gguf.py",
           "types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)",
           "types.append(gguf.TokenType.NORMAL)",
           (EXPORT + "test_f16_and_q8_0_read_back_with_their_tokens_and_logits[llama]",)),

    # Sweeps: the same proposals in any process; hyperband applied.
    Mutant("sweep-engine-not-warmed-up", "finetune/training/sweep.py",
           'for method in ("grid", "random", "bayes"):', "for method in ():",
           (SWEEP + "test_the_engine_proposes_the_same_trials_in_any_process_and_other_ones_for_another_seed",)),
    Mutant("sweep-hyperband-ignored", "finetune/training/sweep.py",
           "stop = any(run.name == name for run in engine().stop_runs(for_engine(config), runs(state, metric)))",
           "stop = False",
           (SWEEP + "test_hyperband_stops_a_trial_worse_than_the_others_at_a_band",)),

    # Preference tuning: the reference is the model training starts from; the split and the accuracy are right.
    Mutant("dpo-reference-adapter-dropped", "finetune/training/trainer.py",
           'if "ref" in peft_config and not trained_on:',
           'if "ref" in peft_config:',
           (PREFERENCE + "test_from_an_sft_run_the_reference_is_the_sft_model[none]",)),
    Mutant("qlora-dpo-adapter-left-in-bf16", "finetune/training/trainer.py",
           "            param.data = adapter[name]\n", "            pass\n",
           (PREFERENCE + "test_from_an_sft_run_the_reference_is_the_sft_model[int4]",)),
    Mutant("dpo-answer-starts-a-token-late", "finetune/data/preference.py",
           "if b > a and b > start), len(ids))", "if b > a and a > start), len(ids))",
           (PREFERENCE + "test_conversational_answer_is_the_assistant_turn_through_its_end",)),
    Mutant("preference-accuracy-counts-ties", "finetune/training/preference.py",
           "if chosen > rejected)", "if chosen >= rejected)",
           (PREFERENCE + "test_held_out_accuracy_scores_chosen_above_rejected",)),
    Mutant("dpo-no-reference-forward-in-flops", "finetune/training/metrics.py",
           "reference = 0 if trainer.args.precompute_ref_log_probs else 1", "reference = 0",
           (PREFERENCE + "test_flops_count_the_reference_forward",)),
    Mutant("init-from-refuses-inherited-keys", "finetune/recipe/load.py",
           "if key not in values or key not in written:", "if key not in values:",
           (PREFERENCE + "test_init_from_decides_what_a_recipe_only_inherits",)),
    Mutant("launcher-one-cpu-thread", "finetune/commands/launch.py",
           "args.num_cpu_threads_per_process = args.num_cpu_threads_per_process or cpu_threads(args)", "pass",
           ("tests/test_scale_out.py::test_cpu_training_processes_share_the_cpus_instead_of_one_thread_each",)),
    Mutant("trl-usage-ping-sent", "finetune/training/trainer.py",
           "        def _send_telemetry(self):\n            pass\n", "",
           (PREFERENCE + "test_no_usage_ping_to_the_hub",)),
]


# The throwaway copy -----------------------------------------------------------------------------------------------

def make_copy(parent: Path) -> Path:
    """The repository's tracked files, as they are in the working tree, copied under `parent`; SHARED linked."""
    copy = parent / "repo"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        source = REPO / name
        if not name or not (source.exists() or source.is_symlink()):  # deleted in the working tree
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)  # keeps modification times: make sees nothing new
    for name in SHARED:
        if (REPO / name).exists():
            (copy / name).symlink_to(REPO / name)
    return copy


def run_env(copy: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": str(copy)}


def check_isolation(copy: Path) -> None:
    """`import finetune` gives the copy's package, from the copy and from another directory; exits if not."""
    for cwd in (copy, copy.parent):
        found = subprocess.run([str(PYTHON), "-c", "import finetune; print(finetune.__file__)"], cwd=cwd,
                               env=run_env(copy), capture_output=True, text=True).stdout.strip()
        if not Path(found).is_relative_to(copy):
            sys.exit(f"mutants: from {cwd}, `import finetune` gives {found!r}, not the copy's package")


def mutate(copy: Path, mutant: Mutant) -> int:
    """Apply the mutation in the copy if its snippet occurs exactly once; returns how many times it occurs."""
    path = copy / mutant.file
    text = path.read_text() if path.is_file() else ""
    found = text.count(mutant.old)
    if found == 1:
        path.write_text(text.replace(mutant.old, mutant.new))
    return found


# Running the tests ------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: int | None  # pytest's exit code; None when it ran past TIMEOUT
    seconds: float
    output: str

    def first_failure(self) -> str:
        """The first failing test of pytest's short test summary ("FAILED id - reason" or "ERROR id - reason")."""
        summary = self.output.partition("short test summary info")[2]
        for line in summary.splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line.split(" - ")[0].split(" ", 1)[1]
        return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join("    " + line for line in self.output.splitlines()[-lines:])


def run_tests(copy: Path, tests: tuple[str, ...]) -> Outcome:
    """pytest on `tests` in the copy, stopping at the first failure; its own temporary directories in the copy's
    parent (not the machine's shared /tmp/pytest-of-USER)."""
    command = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--basetemp={copy.parent / 'pytest'}", *tests]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=copy, env=run_env(copy), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # pytest and every process its tests started (its own session)
        output, _ = process.communicate()
        code = None
    return Outcome(code, time.monotonic() - started, output)


def run_mutant(mutant: Mutant) -> tuple[str, float, str]:
    """(result, seconds, detail) of one mutant, in a copy made for it and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        copy = make_copy(Path(scratch))
        check_isolation(copy)
        found = mutate(copy, mutant)
        if found != 1:
            return "STALE", 0.0, f"the snippet occurs {found} times in {mutant.file}; update the table"
        outcome = run_tests(copy, mutant.tests)
    if outcome.code == 1:
        return "CAUGHT", outcome.seconds, outcome.first_failure()
    if outcome.code == 0:
        return "MISSED", outcome.seconds, "every test passed with the mutation in"
    why = "timed out" if outcome.code is None else f"pytest exited {outcome.code}"
    return "ERROR", outcome.seconds, f"{why}:\n{outcome.tail()}"


def run_baselines(mutants: list[Mutant]) -> bool:
    """Each distinct set of tests, on one unmutated copy: they must pass, or a CAUGHT would mean nothing."""
    test_sets = list(dict.fromkeys(mutant.tests for mutant in mutants))
    passed = True
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as scratch:
        copy = make_copy(Path(scratch))
        check_isolation(copy)
        for tests in test_sets:
            outcome = run_tests(copy, tests)
            ok = outcome.code == 0
            passed = passed and ok
            print(f"baseline {'PASSED' if ok else 'FAILED':<7} {outcome.seconds:5.0f} s  {' '.join(tests)}",
                  flush=True)
            if not ok:
                print(outcome.tail(), flush=True)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--baseline", action="store_true", help="first, run each set of tests without mutation")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {mutant.name for mutant in MUTANTS}
        if unknown:
            parser.error(f"no mutant named {', '.join(sorted(unknown))} (see --list)")
        mutants = [mutant for mutant in MUTANTS if mutant.name in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:<40} {mutant.file:<26} {' '.join(mutant.tests)}")
        return 0

    started = time.monotonic()
    baseline_passed = run_baselines(mutants) if args.baseline else True
    results = {}
    for mutant in mutants:
        result, seconds, detail = run_mutant(mutant)
        results[mutant.name] = result
        print(f"{mutant.name:<40} {result:<7} {seconds:5.0f} s  {detail}", flush=True)

    counts = {result: list(results.values()).count(result) for result in ("CAUGHT", "MISSED", "STALE", "ERROR")}
    print(f"\n{len(results)} mutants: " + ", ".join(f"{count} {result}" for result, count in counts.items())
          + ("" if baseline_passed else "; a baseline FAILED") + f"; {time.monotonic() - started:.0f} s")
    return 0 if baseline_passed and counts["CAUGHT"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
