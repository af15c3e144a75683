"""`python -m cllm evaluate`: quality, tokens/step and paired speed of a model, against greedy AR and its base model.

    python -m cllm evaluate --model runs/demo/cllm-model --base smollm2-135m --prompts json-extract:test \\
        --decoder jacobi --decoder recycle --output runs/demo/eval

The one evaluation engine: `cllm bench` is this command without quality; the recipe runner calls it too.

1. Choices on warm-up prompts that are then never timed (`--warmup` of them, from `SUITE:validation` for a
   `SUITE:test` set, else the set's first ones), `--repeats` each: the AR variant (eager / compiled x dtypes) and
   each decoder's n and dtype per model; then, the winners side by side, each model's *fastest* (AR a candidate).
2. Every test prompt timed (`--timed` lowers it): AR and every chosen decoder of every model back to back on the
   prompt, in rotating order, `--repeats` times, minimum kept (`cllm.timing`).
3. Figures (see `cllm.timing.paired_speedup`): speedup = median of per-prompt ratios with a 95% bootstrap interval,
   the ratio of totals and Spec-Bench's figure beside it; agreement with AR and the speedup over the agreeing
   prompts; tokens/step per sequence and pooled; conversion efficiency = speedup / (tokens/step x c(1)/c(width)),
   pass costs measured here; quality and degenerate rate of every output; **training gain** = the trained model's
   fastest over the base model's fastest, paired per prompt.
4. `DIR/results.json`, `DIR/results.md`, `DIR/records/MODEL/SUITE/RUNNER.jsonl` (Spec-Bench answer files).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cllm.arguments import parse_settings
from cllm.data_modules.prompts import Prompt, check_context, encode_prompts, load_prompts
from cllm.errors import UserError
from cllm.evaluate_figures import figures
from cllm.evaluate_report import markdown
from cllm.files import write_json
from cllm.generate import DecodeSettings, check_decoding_settings
from cllm.hardware import OtherLoad, recorded_cpu_flags
from cllm.jacobi import DecodeOptions
from cllm.models import context_length, eos_ids, load_model, resolve_dtype
from cllm.runners import (
    COMPILED_RECYCLE,
    DECODER_NAMES,
    FAST_PATHS,
    Candidate,
    ar_candidates,
    choose,
    choose_fastest,
    decoder_candidates,
)
from cllm.scoring import agreement_with_base
from cllm.timing import (
    Timings,
    cross_fitted_gain,
    paired_speedup,
    time_paired,
)

SPLIT_SUITES = ("json-extract", "stdlib-code")  # bundled sets with a validation split for the warm-up prompts


@dataclass(kw_only=True)
class EvaluateSettings(DecodeSettings):
    """`cllm evaluate`: quality, tokens/step and paired speed against greedy AR (and the base model).

    Args:
        prompts: prompt sets (repeatable): json-extract:test, stdlib-code:test, humaneval, or a .jsonl file.
        base: the untrained model, timed the same way (training gain = trained fastest / base fastest).
        output: report folder (results.json, results.md, records/).
        decoder: decoders timed (repeatable): jacobi | multiblock | recycle | multiblock+recycle | jacobi+compile |
            recycle+compile.
        limit: evaluate the first K prompts of each set.
        max_new_tokens: generation budget per prompt.
        n_values: block sizes tried per decoder on the warm-up prompts (default: --n).
        dtypes: dtypes tried for AR and every decoder (default: --dtype and float32).
        warmup: warm-up prompts per set (settings are chosen on them; never timed).
        timed: time at most K prompts per set (default: all; the others are decoded once, untimed).
        repeats: R, timings per prompt and runner (the minimum is kept).
        quality: score the outputs (HumanEval pass@1 in the sandbox, json-extract fields).
        unsafe_exec: run HumanEval code without the bubblewrap sandbox where there is none.
        name: the model's name in the report.
    """

    prompts: list[str]
    base: str | None = None
    output: str | None = None
    decoder: list[str] = field(default_factory=lambda: ["jacobi", "recycle"])
    limit: int | None = None
    max_new_tokens: int = 128
    n_values: list[int] | None = None
    dtypes: list[str] | None = None
    warmup: int = 2
    timed: int | None = None
    repeats: int = 3
    quality: bool = True
    unsafe_exec: bool = False
    name: str = "cllm"


def check_settings(settings: EvaluateSettings) -> None:
    """Refuse impossible settings before anything loads or is written."""
    sampled = not settings.sampling().greedy
    named = [d for d in settings.decoder if d not in FAST_PATHS]  # the fast paths are ours, not DECODERS entries
    # with sampling, --compile only drops the (greedy) compiled AR candidates: not an error here
    check_decoding_settings(dataclasses.replace(settings, decoder=named, compile=settings.compile and not sampled))
    for fast in FAST_PATHS:
        if sampled and fast in settings.decoder:
            raise UserError(f"--decoder {fast} with --temperature > 0: the compiled fast path is greedy only")
    if COMPILED_RECYCLE in settings.decoder and settings.candidates < 1:
        raise UserError(f"--decoder {COMPILED_RECYCLE} verifies pool n-grams: --candidates must be >= 1, got 0")
    if settings.n == "auto":
        raise UserError("--n auto: give the candidates instead, --n_values 8 16 32 (chosen on the warm-up prompts)")
    for name in settings.decoder:
        if name not in DECODER_NAMES:
            raise UserError(f"unknown --decoder {name!r}; choose one of {', '.join(DECODER_NAMES)}")
    for key in ("warmup", "repeats"):
        if getattr(settings, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(settings, key)}")
    for key in ("limit", "timed"):
        if getattr(settings, key) is not None and getattr(settings, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(settings, key)}")
    if any(n < 1 for n in settings.n_values or []):
        raise UserError(f"--n_values must be >= 1, got {settings.n_values}")
    if settings.base is not None and settings.base == settings.model:
        raise UserError("--base names the same model as --model; give the untrained model")


def suite_of(source: str) -> str:
    return Path(source).stem if source.endswith((".jsonl", ".parquet")) else source.partition(":")[0]


def prompt_sets(settings: EvaluateSettings) -> dict[str, tuple[list[Prompt], list[Prompt], str]]:
    """suite -> (evaluated prompts, warm-up prompts, where the warm-ups came from)."""
    sets = {}
    for source in settings.prompts:
        suite, split = suite_of(source), source.partition(":")[2]
        prompts = load_prompts(source, limit=settings.limit)
        if suite in SPLIT_SUITES and split == "test":
            warmups, origin = load_prompts(f"{suite}:validation", limit=settings.warmup), f"{suite}:validation"
        else:
            if len(prompts) <= settings.warmup:
                raise UserError(f"{source}: {len(prompts)} prompts leave none to time after --warmup {settings.warmup}")
            warmups, prompts, origin = prompts[: settings.warmup], prompts[settings.warmup :], f"first of {source}"
        sets[suite] = (prompts, warmups, origin)
    return sets


def dtype_names(settings: EvaluateSettings) -> list[str]:
    names = settings.dtypes or [settings.dtype, "float32"]
    resolved = [str(resolve_dtype(d, settings.device)).removeprefix("torch.") for d in names]
    return list(dict.fromkeys(resolved))


class Model:
    """One model loaded in every evaluated dtype, with its tokenizer and the runners chosen per suite."""

    def __init__(self, name: str, spec: str, settings: EvaluateSettings, dtypes: list[str]) -> None:
        self.name, self.spec, self.variants = name, spec, {}
        for dtype in dtypes:
            kwargs = {"attn_implementation": settings.attn_implementation, "device": settings.device}
            self.variants[dtype], self.tokenizer = load_model(spec, dtype=dtype, **kwargs)
        first = next(iter(self.variants.values()))
        self.eos, self.pad = eos_ids(first, self.tokenizer), self.tokenizer.pad_token_id
        self.context = context_length(first)

    def encode(self, prompts: list[Prompt], settings: EvaluateSettings, source: str) -> list[list[int]]:
        ids = encode_prompts(self.tokenizer, prompts, settings.chat_template, self.context, source)
        for prompt, prompt_ids in zip(prompts, ids):
            check_context(prompt_ids, settings.max_new_tokens, self.context, f"{source} prompt {prompt.id!r}")
        return ids

    def candidates(self, settings: EvaluateSettings, longest: int) -> tuple[list[Candidate], dict[str, list]]:
        n_values = settings.n_values or [settings.n]
        max_len = longest + max(n_values) + settings.max_new_tokens + 8
        sampling = settings.sampling()
        ar = ar_candidates(
            self.variants,
            compile=settings.compile and sampling.greedy,
            sampling=sampling,
            max_new_tokens=settings.max_new_tokens,
            eos=self.eos,
            pad_token_id=self.pad,
            max_len=max_len,
        )
        options = DecodeOptions(
            max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad, init=settings.init
        )
        decoders = {
            name: decoder_candidates(
                self.variants, name, n_values, options, settings.decoder_options(), max_len, sampling
            )
            for name in settings.decoder
        }
        return ar, decoders


def evaluate(settings: EvaluateSettings, argv: list[str] | None = None) -> dict:
    """Run the protocol of the module docstring; return the results (written to `settings.output` when set)."""
    check_settings(settings)
    sets = prompt_sets(settings)
    if settings.quality and "humaneval" in sets:
        from cllm.evaluation import require_sandbox

        require_sandbox(settings.unsafe_exec)  # before any decoding, not after
    output = Path(settings.output) if settings.output else None
    dtypes = dtype_names(settings)
    models = [Model(settings.name, settings.model, settings, dtypes)]
    if settings.base:
        models.append(Model("base", settings.base, settings, dtypes))
    results: dict = {
        "command": " ".join(["python -m cllm evaluate", *(argv or [])]),
        "settings": {k: v for k, v in vars(settings).items()} | {"dtypes": dtypes},
        "decoding": settings.sampling().label(),  # greedy, or the sampling settings (AR samples at the same)
        "machine": machine(),
        "models": {m.name: {"spec": m.spec} for m in models},
        "training_gain": {},
    }
    for suite, (prompts, warmups, origin) in sets.items():
        print(f"== {suite}: {len(prompts)} prompts, warm-ups: {len(warmups)} from {origin}", flush=True)
        evaluate_suite(settings, suite, prompts, warmups, models, results, output)
        results["machine"].setdefault("warmup_prompts_from", {})[suite] = origin
    results["machine"]["under_load"] = any(
        share is not None and share > OtherLoad.BUSY_SHARE
        for share in results["machine"]["load_during_timing"].values()
    )
    if output:
        write_json(output / "results.json", results)
        (output / "results.md").write_text(markdown(results))
        print(f"wrote {output}/results.json, results.md and records/")
    print(markdown(results))
    return results


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": recorded_cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_during_timing": {},
    }


def evaluate_suite(settings, suite, prompts, warmups, models, results, output) -> None:
    """Choose on the warm-ups, time every prompt paired, and fill `results` for one prompt set."""
    runners, chosen, fastest, encoded = {}, {}, {}, {}
    for model in models:
        encoded[model.name] = model.encode(prompts, settings, suite)
        warm = model.encode(warmups, settings, f"{suite} warm-ups")
        longest = max(map(len, encoded[model.name] + warm))
        ar, decoders = model.candidates(settings, longest)
        picked = {"ar": choose(ar, warm, settings.repeats)}
        for name, candidates in decoders.items():
            picked[name] = choose(candidates, warm, settings.repeats)
        chosen[model.name] = {kind: candidate for kind, (candidate, _) in picked.items()}
        tables = {kind: table for kind, (_, table) in picked.items()}
        best, final = choose_fastest(list(chosen[model.name].values()), warm, settings.repeats)
        fastest[model.name] = best.label
        results["models"][model.name][suite] = {"choice": tables, "fastest": best.label, "fastest_choice": final}
        for candidate in chosen[model.name].values():
            runners[f"{model.name}/{candidate.label}"] = candidate.run
    if any(encoded[m.name] != encoded[models[0].name] for m in models):
        raise UserError("--base tokenizes the prompts differently from --model; a training gain needs one tokenizer")
    timed = settings.timed or len(prompts)
    print(f"   timing {len(runners)} runners x {min(timed, len(prompts))} prompts x {settings.repeats}", flush=True)
    with OtherLoad() as load:
        timings = time_paired(runners, [p for p in encoded[models[0].name][:timed]], settings.repeats)
    results["machine"]["load_during_timing"][suite] = load.share
    if timed < len(prompts):  # decoded once for quality and tokens/step, not timed
        rest = time_paired(runners, encoded[models[0].name][timed:], 1)
        results["models"][models[0].name][suite]["untimed_prompts"] = len(prompts) - timed
        full = {k: _joined(timings[k], rest[k]) for k in timings}
    else:
        full = timings
    for model in models:
        figures(
            settings, suite, prompts, encoded[model.name], model, chosen[model.name], timings, full, results, output
        )
    if len(models) > 1:
        ar_outputs = [full[f"{m.name}/{chosen[m.name]['ar'].label}"].tokens for m in models]
        results["models"][models[0].name][suite].update(agreement_with_base(*ar_outputs))
        trained, base = (f"{m.name}/{fastest[m.name]}" for m in models)
        gain = paired_speedup(timings[trained], timings[base])
        gain.pop("per_prompt")
        sides = [{c.label: timings[f"{m.name}/{c.label}"].rates for c in chosen[m.name].values()} for m in models]
        results["training_gain"][suite] = gain | {
            "trained_decoder": fastest[models[0].name],
            "base_decoder": fastest[models[1].name],
            "cross_fitted": cross_fitted_gain(*sides),
        }


def _joined(a: Timings, b: Timings) -> Timings:
    return Timings(a.tokens + b.tokens, a.passes + b.passes, a.seconds + b.seconds)


def main(argv: list[str]) -> None:
    evaluate(parse_settings(EvaluateSettings, argv, "cllm evaluate", __doc__), argv)
