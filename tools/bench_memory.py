"""Peak GPU memory of ``train run`` per model shape, mode and token budget, broken down by what holds it. Prints a
table and appends each case's row to docs/bench/results/memory.jsonl as soon as the case ends.

    python tools/bench_memory.py --shards packed/alpaca-qwen3-1024                   # every case
    python tools/bench_memory.py --shards DIR --cases qwen3-4b-qlora-2k,qwen3-8b-lora-16k
    python tools/bench_memory.py --shards DIR --cases tiny-lora-1k --steps 2          # CPU smoke run

Cases ending in ``-hf`` run the same model, data and micro-batches through Hugging Face + peft (+ bitsandbytes for
QLoRA) instead: the QLoRA recipe users follow (``BitsAndBytesConfig`` NF4 with double quantization and bf16 compute,
``prepare_model_for_kbit_training`` with non-reentrant gradient checkpointing, LoRA r16 on the seven projections,
torch AdamW), each micro-batch's packs as one row with restarting position_ids and SDPA attention, in a subprocess of
this script (``--hf-worker``).

Each padless case is one ``python -m padless.train run`` subprocess, as a user runs it: QLoRA cases load a random model
folder (written once per shape into ``--work``, by ``padless.train.random_weights``) with ``--model``, so the base
reaches the GPU as a user's does, NF4 tensor by tensor; bf16 LoRA cases build the random model on the GPU
(``--family``). Peak = ``torch.cuda.max_memory_allocated()`` over the whole run, from loading the model through the
last step, nothing reset. Reported beside it, from the run's summary.json: weights, trainable weights, gradients,
optimizer state, what a step adds (saved activations and workspace), the allocator's slack, the median step time
and tokens/s after the first ``--warmup`` steps, the case's target peak where the project has one, and the peak
that ``train plan`` predicts (with its error against the measured one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_harness as H


@dataclass(frozen=True)
class Case:
    shape: str  # key of H.MODEL_SHAPES
    mode: str  # lora | qlora
    tokens: int  # tokens per micro-batch
    checkpointing: str = "on"
    optimizer: str = "adamw"
    memory: str = "fast"
    target_gib: float | None = None
    system: str = "padless"  # padless | hf (Hugging Face + peft, + bitsandbytes for QLoRA)
    mlp_tile: int = 0  # --mlp-tile-tokens (0: the setting's own choice)

    @property
    def name(self) -> str:
        """shape-mode-Nk, then -low, then what differs from that setting's own choices."""
        if self.memory == "fast":
            checkpointing, optimizer = "on", "adamw"
        else:
            checkpointing, optimizer = _low_checkpointing(self.tokens), "adamw8bit"
        suffix = "" if self.memory == "fast" else f"-{self.memory}"
        suffix += "" if self.checkpointing == checkpointing else f"-{self.checkpointing}"
        suffix += "" if self.optimizer == optimizer else f"-{self.optimizer}"
        suffix += "" if self.system == "padless" else f"-{self.system}"
        if self.mlp_tile:
            suffix += f"-tile{self.mlp_tile // 1024}k" if self.mlp_tile % 1024 == 0 else f"-tile{self.mlp_tile}"
        return f"{self.shape}-{self.mode}-{self.tokens // 1024}k{suffix}"


def _low_checkpointing(tokens: int) -> str:
    """The checkpointing mode ``--memory low`` chooses for micro-batches of ``tokens``."""
    from padless.train.memory_setting import low_memory_checkpointing

    return low_memory_checkpointing("off", tokens)


def _low(
    shape: str,
    mode: str,
    tokens: int,
    target_gib: float | None = None,
    checkpointing: str | None = None,
    mlp_tile: int = 0,
) -> Case:
    """A ``--memory low`` case: its checkpointing mode (unless given) and 8-bit AdamW, as that setting chooses them."""
    checkpointing = checkpointing or _low_checkpointing(tokens)
    return Case(shape, mode, tokens, checkpointing, "adamw8bit", "low", target_gib, mlp_tile=mlp_tile)


CASES = {
    case.name: case
    for case in (
        Case("qwen3-4b", "qlora", 2048),
        Case("qwen3-4b", "qlora", 8192),
        Case("qwen3-4b", "qlora", 32768),
        Case("qwen3-4b", "qlora", 2048, "offload"),
        Case("qwen3-4b", "qlora", 8192, "offload"),
        Case("qwen3-14b", "qlora", 4096),
        Case("qwen3-8b", "lora", 16384),
        _low("qwen3-4b", "qlora", 2048, 3.0),
        _low("qwen3-4b", "qlora", 8192, 3.5),
        _low("qwen3-4b", "qlora", 32768, 6.0),
        _low("qwen3-14b", "qlora", 4096, 12.0),
        _low("qwen3-8b", "lora", 16384, 20.0, checkpointing="on"),
        _low("qwen3-8b", "lora", 16384, 20.0, checkpointing="on", mlp_tile=8192),
        _low("qwen3-8b", "lora", 16384),
        # What --memory low's parts cost apart at 8B/16K: the default with the low setting's MLP tile, and with its
        # 8-bit AdamW too (the vocabulary stays on the GPU; the -low-on case adds only that).
        Case("qwen3-8b", "lora", 16384, mlp_tile=4096),
        Case("qwen3-8b", "lora", 16384, optimizer="adamw8bit", mlp_tile=4096),
        Case("qwen3-4b", "qlora", 2048, system="hf"),
        Case("qwen3-4b", "qlora", 8192, system="hf"),
        Case("qwen3-14b", "qlora", 4096, system="hf"),
        Case("qwen3-8b", "lora", 16384, system="hf"),
        Case("tiny", "lora", 1024),
        Case("tiny", "qlora", 1024),
        Case("tiny", "qlora", 1024, system="hf"),
        _low("tiny", "lora", 1024),
    )
}
DEFAULT_CASES = [name for name in CASES if not name.startswith("tiny")]


def model_config(shape: str, vocab: int) -> Any:
    """The transformers config of ``shape`` for shards of ``vocab`` tokens."""
    from padless.train.modeling import tiny_config

    family, fields = H.model_shape(shape, vocab)
    return tiny_config(family, fields.pop("vocab_size", vocab), **fields)


def model_folder(shape: str, vocab: int, work: Path) -> Path:
    """A random model of ``shape`` written once into ``work`` (reused by later cases and later runs)."""
    from padless.train.random_weights import write_random_model

    folder = work / f"model-{shape}"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        config = model_config(shape, vocab)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_random_model(config, folder, seed=0, dtype=torch.bfloat16, device=device)
        print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def predicted_gib(case: Case, vocab: int, sum_sq_per_token: float) -> float:
    """``train plan``'s peak for the case."""
    from padless.train.plan import Setting, estimate, inventory

    inv = inventory(model_config(case.shape, vocab))
    setting = Setting(case.mode, case.tokens, case.checkpointing, optimizer=case.optimizer, memory=case.memory,
                      mlp_tile=case.mlp_tile)  # fmt: skip
    return estimate(inv, setting, sum_sq_per_token=sum_sq_per_token).peak / 2**30


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_worker(case: Case, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Train ``case`` through Hugging Face + peft in this process; the row's numbers (peak from the process start)."""
    import torch
    from bench_train import packed_row
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from padless.shards.reader import open_shards
    from padless.train.data import pack_sizes, plan_epoch
    from padless.train.metrics import peak_memory_gib
    from padless.train.modeling import load_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if case.mode == "qlora":
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            model_folder(case.shape, vocab, args.work), quantization_config=nf4, dtype=dtype,
            device_map={"": device}, attn_implementation="sdpa",
        )  # fmt: skip
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        family, fields = H.model_shape(case.shape, vocab)
        model = load_model(None, vocab_size=vocab, family=family, dtype=dtype, device=device, config_overrides=fields)
        model.set_attn_implementation("sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    ss = open_shards(args.shards)
    groups = plan_epoch(ss.order(0, 0), pack_sizes(ss).num_tokens, epoch=0, budget=case.tokens).ranks[0]
    times = []
    for group in groups[: args.warmup + args.steps]:
        packs = [ss[int(i)] for i in group]
        row = {k: v.to(device) for k, v in packed_row(packs, None).items()}
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        n = sum(int(p.num_trainable) for p in packs)
        model(**row, use_cache=False, num_items_in_batch=n).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0, sum(int(p.num_tokens) for p in packs)))
    steady = times[args.warmup :] or times
    return {
        "status": "ok",
        "peak_gib": peak_memory_gib(device),
        "step_s": statistics.median(t for t, _ in steady),
        "tokens_per_s": sum(n for _, n in steady) / sum(t for t, _ in steady),
    }


def run_hf_case(case: Case, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    if case.mode == "qlora":
        model_folder(case.shape, vocab, args.work)  # written here, outside the case's timeout
    row_file = args.work / f"row-{case.name}.json"
    row_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--shards", args.shards, "--work", str(args.work), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--hf-worker", case.name, "--row-file", str(row_file)]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.case_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.case_timeout:.0f} s"}
    if proc.returncode != 0 or not row_file.is_file():
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"exit {proc.returncode}: {last[:200]}"}
    return {**json.loads(row_file.read_text()), "wall_s": time.perf_counter() - t0}


def run_case(case: Case, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    if case.system == "hf":
        return run_hf_case(case, args, vocab)
    out = args.work / f"run-{case.name}"
    cmd = [sys.executable, "-m", "padless.train", "run", args.shards, "--output", str(out), "--overwrite",
           f"--{case.mode}", "--tokens-per-micro-batch", str(case.tokens), "--memory", case.memory,
           "--max-steps", str(args.warmup + args.steps), "--eval-every", "-1", "--no-progress", "--force"]  # fmt: skip
    cmd += ["--checkpointing", case.checkpointing]
    if case.mlp_tile:
        cmd += ["--mlp-tile-tokens", str(case.mlp_tile)]
    if case.memory == "fast":  # --memory low chooses the optimizer (8-bit AdamW on CUDA)
        cmd += ["--optimizer", case.optimizer]
    if case.mode == "qlora":
        cmd += ["--model", str(model_folder(case.shape, vocab, args.work))]
    else:
        family, fields = H.model_shape(case.shape, vocab)
        cmd += ["--family", family, "--model-overrides", json.dumps(fields)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.case_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.case_timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"exit {proc.returncode}: {last[:200]}"}
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "step_time_s" in r and r["step"] > args.warmup]
    memory = summary.get("memory_gib") or {}
    return {
        "status": "ok",
        "peak_gib": summary["peak_mem_gib"],
        "memory_gib": memory,
        "step_s": statistics.median(r["step_time_s"] for r in steady) if steady else None,
        "tokens_per_s": summary.get("steady_tokens_per_s"),
        "cuda_graphs": summary.get("cuda_graphs"),
        "wall_s": wall,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard set from prep pack")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {','.join(CASES)}")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step time")
    p.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up")
    p.add_argument("--work", type=Path, default=Path("bench-memory"), help="model folders and runs (kept)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="seconds before a case's row is a timeout")
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)  # internal: run this -hf case here, write --row-file
    p.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)
    H.add_results_args(p, "memory")
    args = p.parse_args(argv)
    args.cases = H.comma_choices(p, "--cases", args.cases, CASES)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hf_worker:
        from padless.shards.reader import open_shards as _open

        vocab = int(_open(args.shards).manifest["tokenizer"]["vocab_size"])
        args.row_file.write_text(json.dumps(hf_worker(CASES[args.hf_worker], args, vocab)))
        return
    from padless.shards.reader import open_shards
    from padless.train.plan import shard_statistics

    manifest = open_shards(args.shards).manifest
    sum_sq_per_token = shard_statistics(args.shards)[1]
    vocab = int(manifest["tokenizer"]["vocab_size"])
    args.work.mkdir(parents=True, exist_ok=True)
    smoke = all(name.startswith("tiny") for name in args.cases)
    rows = []
    for name in args.cases:
        case = CASES[name]
        print(f"=== {name}", flush=True)
        result = run_case(case, args, vocab)
        result["predicted_gib"] = predicted_gib(case, vocab, sum_sq_per_token) if case.system == "padless" else None
        if result.get("peak_gib") and result["predicted_gib"] is not None:
            result["predicted_error"] = result["predicted_gib"] / result["peak_gib"] - 1
        print(json.dumps(result), flush=True)
        rows.append({"bench": "memory", "case": name, "system": case.system, "shape": case.shape, "mode": case.mode,
                     "tokens": case.tokens,
                     "checkpointing": case.checkpointing, "optimizer": case.optimizer, "memory": case.memory,
                     "target_gib": case.target_gib,
                     "shards": args.shards,
                     "shards_fingerprint": manifest.get("fingerprint"), **result})  # fmt: skip
        H.record(args, "memory", rows[-1:], smoke=smoke)  # each case as it ends: a killed run keeps them
    cols = [("case", "case", "s"), ("peak_gib", "peak GiB", ".2f"), ("target_gib", "target", ".1f"),
            ("predicted_gib", "plan", ".2f"), ("predicted_error", "plan err", "+.1%"),
            ("memory_gib.weights", "weights", ".2f"), ("memory_gib.trainable", "trainable", ".2f"),
            ("memory_gib.gradients", "grads", ".2f"), ("memory_gib.optimizer", "optim", ".2f"),
            ("memory_gib.step", "step", ".2f"), ("memory_gib.saved", "saved", ".2f"),
            ("memory_gib.workspace", "workspace", ".2f"), ("memory_gib.slack", "slack", ".2f"),
            ("step_s", "s/step", ".3f"), ("tokens_per_s", "tok/s", ",.0f"), ("status", "status", "s")]  # fmt: skip
    print(H.format_table(rows, cols, title=f"\ntrain run peak memory on {H.environment()['gpu']}"))


if __name__ == "__main__":
    main()
