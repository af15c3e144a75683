"""`results.md` of `cllm evaluate`: the tables a reader needs, every figure named with its convention."""

from __future__ import annotations

from cllm.records import REPETITION_LIMIT

QUALITY_KEYS = ("pass_at_1", "valid", "exact", "fields")
CONVENTIONS = f"""Conventions: **x AR** = median over timed prompts of (decoder tokens/s / AR tokens/s), batch 1,
prefill included, with its 95% bootstrap interval; *totals* = ratio of summed tokens over summed seconds; *Spec-Bench*
= mean per-prompt tokens/s over AR's, computed as hemingkx/Spec-Bench's evaluation/speed.py does from the records;
**tokens/step** = generated tokens / decode passes per sequence, averaged (*pooled*: all tokens / all passes,
Spec-Bench's mean accepted length; *non-degen.*: over the outputs without a run of {REPETITION_LIMIT} identical
tokens, which a repetition loop cannot inflate); **= AR**: share of timed prompts whose output equals AR's token for
token (x AR over those prompts beside it); **conv.**: conversion efficiency = x AR / (tokens/step x c(1)/c(width)),
pass costs measured in this run; AR and every decoder of every model ran back to back per prompt in rotating order,
each the minimum of R repeats; settings (AR variant, n, dtype) were chosen on warm-up prompts that were not timed."""


def _quality(entry: dict) -> str:
    return ", ".join(f"{k} {entry[k]:.3f}" for k in QUALITY_KEYS if k in entry) or "-"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(figure: dict) -> str:
    lo, hi = figure["ci95"]
    return f"{figure['median']:.2f}x [{lo:.2f}, {hi:.2f}]"


def suite_rows(name: str, entry: dict) -> list[str]:
    """Markdown table rows of one model on one suite: AR, then every decoder."""
    ar = entry["ar"]
    rows = [
        f"| {name} | AR ({ar['variant']}) | 1.000 | 1.000 | 1.000 | 1.00x | - | - | - | - | "
        f"{entry['degenerate_rate']:.2f} | {_quality(entry)} |"
    ]
    for d in entry["decoders"].values():
        speed, agreeing = d["speedup_vs_ar"], d["speedup_vs_ar_agreeing"]
        agree = f"{d['agreement_with_ar']:.0%}" + (f" ({agreeing['median']:.2f}x)" if agreeing else "")
        rows.append(
            f"| {name} | {d['setting']} | {d['tokens_per_step']:.3f} | {d['tokens_per_step_pooled']:.3f} | "
            f"{_number(d.get('tokens_per_step_non_degenerate'))} | "
            f"{_interval(speed)} | {speed['ratio_of_totals']:.2f}x | {speed['spec_bench']:.2f}x | {agree} | "
            f"{d['conversion_efficiency']:.2f} | {d['degenerate_rate']:.2f} | {_quality(d['quality'])} |"
        )
    return rows


def cross_fitted_line(crossed: dict) -> str:
    """The cross-fitted training gain in one sentence, with each fold's two choices."""
    lo, hi = crossed["ci95"]
    picks = "; ".join(f"{f['trained_decoder']} over {f['base_decoder']}" for f in crossed["folds"])
    return (
        f"Cross-fitted: {crossed['median']:.2f}x [{lo:.2f}, {hi:.2f}] (each side's fastest chosen on the other half "
        f"of the timed prompts: {picks})"
    )


def markdown(results: dict) -> str:
    """The whole report: machine, one table per suite, the training gain, the conventions."""
    machine = results["machine"]
    loads = ", ".join(
        f"{suite} {share:.0%}" if share is not None else f"{suite} unknown"
        for suite, share in machine["load_during_timing"].items()
    )
    lines = [
        f"# cllm evaluate: {', '.join(results['settings']['prompts'])}",
        "",
        f"`{results['command']}`",
        "",
        f"Decoding: {results.get('decoding', 'greedy')} (AR and every decoder alike).",
        "",
        f"Machine: {machine['cpu']}, CPU flags {', '.join(machine['cpu_flags']) or '-'}, "
        f"{machine['torch_threads']} torch threads{', ' + machine['cuda'] if machine.get('cuda') else ''}; "
        f"CPU share of other processes during timing: {loads or '-'}"
        + (" -- **timed under load: speed figures are not this machine's**" if machine.get("under_load") else ""),
        "",
    ]
    suites = [s for s in next(iter(results["models"].values())) if s != "spec"]
    for suite in suites:
        any_entry = next(iter(results["models"].values()))[suite]
        lines += [
            f"## {suite} ({any_entry['timed_prompts']} of {any_entry['n_prompts']} prompts timed, warm-ups from "
            f"{machine.get('warmup_prompts_from', {}).get(suite, '?')})",
            "",
        ]
        gain = results.get("training_gain", {}).get(suite)
        if gain:
            lo, hi = gain["ci95"]
            lines += [
                f"**Training gain: {gain['median']:.2f}x [{lo:.2f}, {hi:.2f}]** ({gain['n_prompts']} prompts; "
                f"trained {gain['trained_decoder']} over base {gain['base_decoder']}, each its fastest on the "
                f"warm-ups; totals {gain['ratio_of_totals']:.2f}x)",
                "",
            ]
            if gain.get("cross_fitted"):
                lines += [cross_fitted_line(gain["cross_fitted"]), ""]
        lines += [
            "| model | decoder | tokens/step | pooled | non-degen. | x AR [95% CI] | totals | Spec-Bench | = AR | "
            "conv. | degen. | quality |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, model in results["models"].items():
            lines += suite_rows(name, model[suite])
        lines.append("")
    if "recipe" in results:
        lines += recipe_lines(results["recipe"])
    lines += [CONVENTIONS, ""]
    return "\n".join(lines)


def recipe_lines(recipe: dict) -> list[str]:
    """The recipe behind a `cllm run` report: file, variant, stage times, validation curve."""
    curve = ", ".join(f"{int(step)}: {value:.3f}" for step, value in recipe["validation_curve"]) or "-"
    times = ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in recipe["timings"].items())
    variant = " + ".join(recipe["overlays"] + recipe["overrides"]) or "none"
    return [
        f"## Recipe `{recipe['file']}` ({recipe['date']})",
        "",
        f"Base model {recipe['base_model']}, n = {recipe['n']}; variant: {variant}; stages: {times or '-'}.",
        f"Validation tokens/step by step (held-out validation prompts, during the fit): {curve}.",
        "",
    ]
