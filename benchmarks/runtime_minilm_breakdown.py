"""Where one sentence's time goes in all-MiniLM-L6-v2 at 90%, dense and converted: why the batch-1 ratio sits near 2x.

The setting of runtime_targets.py (`minilm_at_90`: its 8 sentences of 11 to 33 tokens, one per call), both models in
one process:

1. Whole model against its Linear layers: each `nn.Linear` (dense model) and `SparseLinear` (converted model) forward
   is timed from inside (perf_counter around the call), the rest of the model is the whole time minus that. Passes
   alternate between the models; medians over the passes. The timing itself adds about a microsecond per layer call.
2. The same layers alone: each layer called again and again on an input of the token count it saw in the model (its
   weights and input hot in the cache), summed as the model calls them; what the model's own calls cost above that is
   what a cold cache and the ops between them cost.
3. A few of the other modules (GELU, LayerNorm, self-attention) inside the model, and the first two alone on inputs of
   the same shape.

Amdahl's law decides the ratio: whatever the sparse layers gain, the rest of the model (identical in both) is paid in
full by both. Run: python benchmarks/runtime_minilm_breakdown.py [--passes 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from runtime_common import machine, write_results
from runtime_targets import minilm_at_90

from sparsearch.runtime import SparseLinear

OTHER_OPS = ("GELUActivation", "LayerNorm", "BertSdpaSelfAttention", "BertSelfAttention")
LINEAR_KINDS = ("Linear", "SparseLinear")  # a layer the conversion kept dense (the pooler's) counts as a layer too


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def hot_us(module: torch.nn.Module, shape: torch.Size, repeats: int = 200) -> float:
    """Median microseconds of `module` called back to back on one random input of `shape` (after 20 warm-up
    calls): its weights and input hot in the cache."""
    x = torch.randn(shape)
    for _ in range(20):
        module(x)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        module(x)
        samples.append(time.perf_counter_ns() - start)
    return median_us(samples)


class Recorder:
    """Times the forward of every module of the given classes of a model, by instance, with the input's shape."""

    def __init__(self, model: torch.nn.Module, classes: tuple[type, ...], names: tuple[str, ...] = ()) -> None:
        self.calls: dict[str, list[tuple[torch.nn.Module, torch.Size, int]]] = collections.defaultdict(list)
        self.active = False
        for module in model.modules():
            if isinstance(module, classes) or type(module).__name__ in names:
                self._wrap(module)

    def _wrap(self, module: torch.nn.Module) -> None:
        forward, kind = module.forward, type(module).__name__

        def timed(*args: object, **kwargs: object) -> object:
            if not self.active:
                return forward(*args, **kwargs)
            start = time.perf_counter_ns()
            out = forward(*args, **kwargs)
            self.calls[kind].append((module, args[0].shape, time.perf_counter_ns() - start))
            return out

        module.forward = timed


@torch.no_grad()
def measure(passes: int) -> dict:
    sentences, pruned, fast, report = minilm_at_90()
    counts = sorted(int(s["input_ids"].numel()) for s in sentences)
    models = {"dense": pruned, "sparse": fast}
    recorders = {name: Recorder(m, (torch.nn.Linear, SparseLinear), OTHER_OPS) for name, m in models.items()}
    whole: dict[str, list[float]] = {name: [] for name in models}
    linear: dict[str, list[float]] = {name: [] for name in models}
    for index in range(passes + 3):
        for name, m in models.items():
            recorder = recorders[name]
            recorder.calls.clear()
            recorder.active = True
            start = time.perf_counter_ns()
            for s in sentences:
                m(**s)
            elapsed = time.perf_counter_ns() - start
            recorder.active = False
            if index >= 3:  # warm-up passes
                whole[name].append(elapsed / len(sentences) / 1e6)
                layer_ns = sum(t for kind in LINEAR_KINDS for *_, t in recorder.calls[kind])
                linear[name].append(layer_ns / len(sentences) / 1e6)
    result = {"sentences": len(sentences), "tokens": counts, "sparse_layers": len(report.sparse_layers),
              "fused_activations": len(report.fused_activations), "passes": passes, "models": {}}
    for name in models:
        calls = recorders[name].calls  # the last pass, one call per layer and sentence
        layer_calls = [call for kind in LINEAR_KINDS for call in calls[kind]]
        # each layer alone, hot, on an input of the shape it had in the model, summed over the model's calls
        alone = sum(hot_us(mod, shape) for mod, shape, _ in layer_calls)
        rest = [w - lin for w, lin in zip(whole[name], linear[name], strict=True)]
        others = {}
        for kind in OTHER_OPS:
            if kind not in calls:
                continue
            others[kind] = {"in_model_us": median_us([t for *_, t in calls[kind]])}
            if kind in ("GELUActivation", "LayerNorm"):  # one input: the whole attention module takes several
                mod, shape, _ = calls[kind][0]
                others[kind]["alone_us"] = hot_us(mod, shape)
        result["models"][name] = {
            "whole_ms_per_sentence": statistics.median(whole[name]),
            "linear_ms_per_sentence": statistics.median(linear[name]),
            "rest_ms_per_sentence": statistics.median(rest),
            "linear_alone_ms_per_sentence": alone / len(sentences) / 1e3,
            "linear_calls_per_sentence": len(layer_calls) / len(sentences), "other_ops": others}
    return result


def to_markdown(payload: dict) -> str:
    r = payload["result"]
    d, s = r["models"]["dense"], r["models"]["sparse"]
    lines = [f"all-MiniLM-L6-v2 pruned to 90% (magnitude), {r['sparse_layers']} layers sparse after "
             f"`convert_transformers`; {r['sentences']} sentences of {r['tokens'][0]} to {r['tokens'][-1]} tokens, one "
             f"per call; medians over {r['passes']} passes, the two models alternating. Produced by "
             "benchmarks/runtime_minilm_breakdown.py.", "",
             f"The converted model computes {r.get('fused_activations', 0)} of its GELUs inside the sparse layers "
             "before them (fused), so there they count in the layers' time; the dense model's count in the rest.",
             "",
             "| ms per sentence | dense | converted | dense / converted |", "|---|---|---|---|"]
    for key, label in (("whole_ms_per_sentence", "whole model"),
                       ("linear_ms_per_sentence", "its Linear / SparseLinear layers, timed inside the model"),
                       ("rest_ms_per_sentence", "the rest (embeddings, attention, GELU, LayerNorm, residuals, Python)"),
                       ("linear_alone_ms_per_sentence", "the same layer calls, each layer alone and hot")):
        lines.append(f"| {label} | {d[key]:.2f} | {s[key]:.2f} | {d[key] / s[key]:.2f}x |")
    ratio = d["whole_ms_per_sentence"] / s["whole_ms_per_sentence"]
    bound = (d["whole_ms_per_sentence"]) / s["rest_ms_per_sentence"]
    lines += ["", f"Whole model: {ratio:.2f}x. The rest of the model is {s['rest_ms_per_sentence']:.2f} ms of the "
              f"converted model's {s['whole_ms_per_sentence']:.2f} ms per sentence, so even sparse layers that cost "
              f"nothing would give at most {bound:.2f}x here.", "",
              "| op, per call | dense model: in the model / alone, hot (us) | converted model: in the model / alone, "
              "hot (us) |", "|---|---|---|"]
    for kind in d["other_ops"]:
        cells = []
        for model in (d, s):
            op = model["other_ops"].get(kind, {})
            alone = f" / {op['alone_us']:.1f}" if "alone_us" in op else ""
            cells.append(f"{op['in_model_us']:.1f}{alone}" if op else "-")
        label = f"{kind} (its query, key and value layers included)" if "SelfAttention" in kind else kind
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.passes < 1 or args.threads < 1:
        parser.error(f"--passes and --threads must be >= 1, got {args.passes} and {args.threads}")
    torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = args.threads
    payload = {"machine": info, "result": measure(args.passes)}
    markdown = to_markdown(payload)
    write_results("runtime_minilm_breakdown", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
