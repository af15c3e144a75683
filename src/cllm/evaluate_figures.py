"""The report entry of one model on one prompt set in `cllm evaluate` (see its docstring for the protocol)."""

from __future__ import annotations

import statistics
from pathlib import Path

from cllm.scoring import has_repeated_run, quality
from cllm.spec_bench import answer_lines, speed, write_answers
from cllm.timing import Timings, agreeing_speedup, agreement, conversion_efficiency, paired_speedup, pass_seconds


def degenerate_rate(outputs: list[list[int]]) -> float:
    return sum(map(has_repeated_run, outputs)) / max(len(outputs), 1)


def tokens_per_step_non_degenerate(timing: Timings) -> float | None:
    """Tokens/step over the outputs that are not degenerate (None when every one is): a repetition loop is easy to
    guess in parallel, so degenerate outputs inflate acceptance, and this is the figure a quality loss cannot buy."""
    kept = [k for k, tokens in enumerate(timing.tokens) if not has_repeated_run(tokens)]
    if not kept:
        return None
    return Timings(tokens=[timing.tokens[k] for k in kept], passes=[timing.passes[k] for k in kept]).tokens_per_step


def figures(settings, suite, prompts, encoded, model, chosen, timings, full, results, output) -> None:
    """The report entry of one model on one suite (quality, AR, every decoder) and its Spec-Bench records."""
    entry = results["models"][model.name][suite]
    ar = chosen["ar"]
    ar_timing, ar_full = timings[f"{model.name}/{ar.label}"], full[f"{model.name}/{ar.label}"]
    texts = {
        key: [model.tokenizer.decode(t, skip_special_tokens=True) for t in full[f"{model.name}/{c.label}"].tokens]
        for key, c in chosen.items()
    }
    ids = [p.id for p in prompts]
    records = {}
    for key, candidate in chosen.items():
        timing = full[f"{model.name}/{candidate.label}"]
        lines = answer_lines(
            ids,
            texts[key],
            timing.tokens,
            timing.passes,
            timing.seconds,
            model_id=f"{model.spec}:{candidate.label}",
            category=suite,
        )
        records[key] = lines
        if output:
            path = Path("records") / model.name / suite / f"{candidate.label.replace(' ', '_').replace('=', '')}.jsonl"
            write_answers(output / path, lines)
            entry.setdefault("records", {})[key] = str(path)
    entry.update(quality(suite, prompts, texts["ar"]) if settings.quality else {})
    entry["degenerate_rate"] = degenerate_rate(ar_full.tokens)
    entry["n_prompts"], entry["timed_prompts"] = len(prompts), len(ar_timing.seconds)
    entry["ar"] = {
        "variant": ar.label,
        "dtype": ar.dtype,
        "tokens_per_s": sum(map(len, ar_timing.tokens)) / sum(ar_timing.seconds),
        "median_tokens_per_s": statistics.median(ar_timing.rates),
    }
    # the cache length of a typical pass: the median prompt plus half the budget
    context = int(statistics.median(map(len, encoded))) + settings.max_new_tokens // 2
    cost_one = pass_seconds(model.variants[ar.dtype], context, 1)
    entry["ar"]["pass_seconds"] = cost_one
    entry["decoders"] = {}
    for key, candidate in chosen.items():
        if key == "ar":
            continue
        timing, whole = timings[f"{model.name}/{candidate.label}"], full[f"{model.name}/{candidate.label}"]
        speedup = paired_speedup(timing, ar_timing)
        speedup.pop("per_prompt")
        timed = len(timing.seconds)  # Spec-Bench's figure, from the records as Spec-Bench computes it
        speedup["spec_bench"] = speed(records[key][:timed], records["ar"][:timed], model.tokenizer)["speedup"]
        cost = pass_seconds(model.variants[candidate.dtype], context, candidate.width)
        entry["decoders"][key] = {
            "setting": candidate.label,
            "n": candidate.n,
            "dtype": candidate.dtype,
            "pass_width": candidate.width,
            "tokens_per_step": whole.tokens_per_step,
            "tokens_per_step_pooled": whole.tokens_per_step_pooled,
            "tokens_per_step_non_degenerate": tokens_per_step_non_degenerate(whole),
            "speedup_vs_ar": speedup,
            "agreement_with_ar": agreement(timing, ar_timing),
            "speedup_vs_ar_agreeing": agreeing_speedup(timing, ar_timing),
            "pass_seconds": cost,
            "conversion_efficiency": conversion_efficiency(speedup["median"], timing.tokens_per_step, cost_one, cost),
            "degenerate_rate": degenerate_rate(whole.tokens),
            "quality": quality(suite, prompts, texts[key]) if settings.quality else {},
        }
