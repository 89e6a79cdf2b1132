"""End-to-end LoRA training benchmark: padless's trainer against Hugging Face + peft (padded batches, packed rows with
SDPA or FlexAttention), Liger-Kernel + HF + peft and Unsloth (when importable). Prints a table and appends one row per
system to docs/bench/results/train.jsonl.

    python -m padless.prep pack ../shared/data/alpaca/alpaca_data_en_52k.jsonl.gz --max-len 1024 \\
        --tokenizer ../shared/data/tokenizers/qwen3-4b-thinking-2507 --out packed/alpaca-qwen3-1024
    python tools/bench_train.py --shards packed/alpaca-qwen3-1024 --preset qwen3-8b      # every system
    python tools/bench_train.py --shards packed/alpaca-qwen3-1024 --preset llama3-8b --systems padless,hf-padded
    python tools/bench_train.py --shards DIR --preset tiny --warmup 1 --steps 1           # CPU smoke run

Every system trains the same randomly initialised model (``padless.train.modeling.load_model`` with the preset's
shape and the same seed, so identical base weights; bf16 on a GPU, fp32 on the CPU) with LoRA r 16 / alpha 16 /
dropout 0 on q,k,v,o,gate,up,down and gradient checkpointing, on the same examples: step k holds the packs of
padless's micro-batch k (the shard set's seeded order filled up to ``--tokens`` tokens). Loss = token-loss sum / the
step's trainable tokens, AdamW, gradient norm clipped to 1.0.

- ``padless``: the product's own path, ``padless.train.loop.train(TrainConfig(...))`` as ``train run`` calls it
  (``--cuda-graphs auto``); ``padless-eager``: the same with CUDA graphs off. Numbers come from the run's
  metrics.jsonl (step_time_s, tokens, peak memory).
- ``hf-padded``: the step's examples right-padded, ``--padded-batch`` examples per micro-batch (gradient accumulation).
- ``hf-packed-sdpa``, ``hf-packed-flex``: the step's packs as one row, position_ids restarting per example, no
  attention mask (transformers builds the block-diagonal mask); Flex rows are padded to ``--tokens`` (one compiled
  shape). ``liger-padded``, ``liger-packed-flex``: the same with Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused
  linear cross-entropy applied to the instance. ``unsloth``: FastLanguageModel on the padded batches.

Each system runs in its own subprocess (GPU memory isolation; a crash or ``--system-timeout`` costs one row).
Reported: steady-state real (non-padding) tokens/s and trainable tokens/s over the steps after ``--warmup``, median
seconds per step, peak allocated memory from the process start (CPU: peak resident memory), the first and last step
losses (step 1 is the same for every system: the LoRA update starts at zero).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import bench_harness as H

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = H.MODEL_SHAPES
SYSTEMS = ("padless", "padless-eager", "hf-padded", "hf-packed-sdpa", "hf-packed-flex", "liger-padded",
           "liger-packed-flex", "unsloth")  # fmt: skip
NEEDS_CUDA = {"hf-packed-flex", "liger-padded", "liger-packed-flex", "unsloth"}
PEER_PACKAGE = {"liger-padded": "liger_kernel", "liger-packed-flex": "liger_kernel", "unsloth": "unsloth"}


def summarise(records: list[dict], warmup: int) -> dict[str, Any]:
    """Steady state (steps after ``warmup``) from per-step records with step_time_s, tokens, trainable_tokens."""
    steady = [r for r in records if r["step"] > warmup] or records
    seconds = sum(r["step_time_s"] for r in steady)
    return {
        "tokens_per_s": sum(r["tokens"] for r in steady) / seconds,
        "trainable_tokens_per_s": sum(r["trainable_tokens"] for r in steady) / seconds,
        "step_s": statistics.median(r["step_time_s"] for r in steady),
        "tokens_per_step": statistics.mean(r["tokens"] for r in records),
        "peak_gib": max(r["peak_mem_gib"] for r in records),
        "losses": [r["loss"] for r in records],
    }


# -------------------------------------------------------------------------------------------- padless (product)
def run_padless(args: argparse.Namespace, family: str, shape: dict, out: Path, graphs: bool) -> list[dict]:
    from padless.train.config import TrainConfig
    from padless.train.loop import train

    cfg = TrainConfig(shards=args.shards, output=str(out), family=family, model_overrides=json.dumps(shape),
                      tokens_per_micro_batch=args.tokens, checkpointing="on", max_steps=args.warmup + args.steps,
                      lr=args.lr, seed=args.seed, lora_r=16, lora_alpha=16, lora_dropout=0.0,
                      target_modules=",".join(LORA_TARGETS), cuda_graphs="auto" if graphs else "off",
                      eval_every=-1, progress=False)  # fmt: skip
    train(cfg)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step_time_s" in r]


# ----------------------------------------------------------------------------------------------------- peers
def padded_batches(packs: list, batch: int) -> list[dict]:
    """The packs' examples in order, ``batch`` per micro-batch, right-padded (labels -100, attention_mask 0)."""
    import numpy as np
    import torch

    ex = [(p.input_ids[a:b].astype(np.int64), p.labels[a:b]) for p in packs
          for a, b in zip(p.cu_seqlens[:-1].tolist(), p.cu_seqlens[1:].tolist())]  # fmt: skip
    out = []
    for s in range(0, len(ex), batch):
        chunk = ex[s : s + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (i, lab) in enumerate(chunk):
            ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = torch.from_numpy(i), torch.from_numpy(lab), 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def packed_row(packs: list, pad_to: int | None) -> dict:
    """The packs end to end as one row: position_ids restart per example; ``pad_to`` appends an ignored filler."""
    import numpy as np
    import torch

    ids = np.concatenate([p.input_ids for p in packs]).astype(np.int64)
    labels = np.concatenate([p.labels for p in packs])
    pos = np.concatenate([p.position_ids for p in packs]).astype(np.int64)
    if pad_to and pad_to > len(ids):
        extra = pad_to - len(ids)
        ids, pos = np.concatenate([ids, np.zeros(extra, np.int64)]), np.concatenate([pos, np.arange(extra)])
        labels = np.concatenate([labels, np.full(extra, -100, np.int64)])
    return {k: torch.from_numpy(v)[None] for k, v in (("input_ids", ids), ("position_ids", pos), ("labels", labels))}


def peer_model(system: str, args: argparse.Namespace, family: str, shape: dict, vocab: int, ss, device, dtype):
    """The peer's model with LoRA on: the same base weights as padless's (same builder, seed and device)."""
    import torch

    from padless.train.modeling import load_model

    if system == "unsloth":
        return unsloth_model(args, family, shape, vocab, ss, device, dtype)
    model = load_model(None, vocab_size=vocab, family=family, dtype=dtype, device=device, seed=args.seed,
                       config_overrides=shape)  # fmt: skip
    model.set_attn_implementation("flex_attention" if system.endswith("flex") else "sdpa")
    if system.startswith("liger"):
        import liger_kernel.transformers as liger

        apply = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}")
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(args.seed + 1)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def unsloth_model(args, family: str, shape: dict, vocab: int, ss, device, dtype):
    """Unsloth loads only from a folder: the same random base saved with the shards' tokenizer, then its LoRA."""
    from transformers import AutoTokenizer
    from unsloth import FastLanguageModel

    from padless.train.modeling import load_model

    folder = Path(tempfile.mkdtemp(prefix="bench-unsloth-"))
    model = load_model(None, vocab_size=vocab, family=family, dtype=dtype, device=device, seed=args.seed,
                       config_overrides=shape)  # fmt: skip
    model.save_pretrained(folder)
    del model
    AutoTokenizer.from_pretrained(ss.manifest["tokenizer_source"]).save_pretrained(folder)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=ss.max_len, dtype=dtype,
                                                 load_in_4bit=False, local_files_only=True)  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    lora = dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, random_state=args.seed + 1)
    return FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="unsloth", **lora)


def run_peer(system: str, args: argparse.Namespace, family: str, shape: dict) -> list[dict]:
    """Train ``system`` on padless's micro-batch plan; one record per step, as padless's metrics.jsonl has them."""
    import torch

    from padless.shards.reader import open_shards
    from padless.train.data import pack_sizes, plan_epoch
    from padless.train.metrics import peak_memory_gib

    ss = open_shards(args.shards)
    vocab = int(ss.manifest["tokenizer"]["vocab_size"])
    groups = plan_epoch(ss.order(args.seed, 0), pack_sizes(ss).num_tokens, epoch=0, budget=args.tokens).ranks[0]
    if len(groups) < args.warmup + args.steps:
        raise SystemExit(f"{args.shards} gives {len(groups)} steps of {args.tokens} tokens; fewer --warmup/--steps")
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda:0" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    model = peer_model(system, args, family, shape, vocab, ss, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda)
    records = []  # peak memory counts from the process start, model build included, as padless's metrics do
    for step, group in enumerate(groups[: args.warmup + args.steps], start=1):
        packs = [ss[int(i)] for i in group]
        if "packed" in system:
            batches = [packed_row(packs, args.tokens if system.endswith("flex") else None)]
        else:
            batches = padded_batches(packs, args.padded_batch)
        n_step = sum(int(p.num_trainable) for p in packs)
        if cuda:
            torch.cuda.synchronize(device)
        t0, total = time.perf_counter(), torch.zeros((), device=device)
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, num_items_in_batch=n_step).loss
            loss.backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(total)  # host-device sync: the step is done
        records.append({"step": step, "loss": loss_value, "tokens": sum(int(p.num_tokens) for p in packs),
                        "trainable_tokens": n_step, "step_time_s": time.perf_counter() - t0,
                        "peak_mem_gib": peak_memory_gib(device)})  # fmt: skip
        print(f"  {system} step {step}: loss {loss_value:.4f}, {records[-1]['step_time_s']:.3f} s", flush=True)
    return records


# ------------------------------------------------------------------------------------------- worker and parent
def worker(args: argparse.Namespace) -> None:
    """Run one system in this process and write its row (JSON) to ``args.row_file``."""
    import torch

    from padless.shards.reader import open_shards

    if args.worker == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers when imported)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny CPU models: more threads only contend on a small shared machine
    family, shape = H.model_shape(args.preset, int(open_shards(args.shards).manifest["tokenizer"]["vocab_size"]))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            if args.worker.startswith("padless"):
                records = run_padless(args, family, shape, Path(tmp) / "run", graphs=args.worker == "padless")
            else:
                records = run_peer(args.worker, args, family, shape)
        row = {"status": "ok", **summarise(records, args.warmup)}
    except Exception as error:  # out of memory, a peer's own failure: the row says so, the line-up goes on
        traceback.print_exc()
        row = {"status": f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:160]}
    Path(args.row_file).write_text(json.dumps(row))


def static_status(system: str, cuda: bool) -> str | None:
    """Why ``system`` cannot run here (no GPU, peer not importable), or None."""
    if system in NEEDS_CUDA and not cuda:
        return "skipped: needs CUDA"
    package = PEER_PACKAGE.get(system)
    if package and importlib.util.find_spec(package) is None:
        return f"n/a: {package} not importable"
    return None


def run_system(system: str, argv: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        row_file = Path(f.name)
    try:
        cmd = [sys.executable, __file__, *argv, "--worker", system, "--row-file", str(row_file)]
        proc = subprocess.run(cmd, timeout=timeout)
        text = row_file.read_text()
        return json.loads(text) if text else {"status": f"crashed (exit {proc.returncode}; see the output above)"}
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    finally:
        row_file.unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard set from prep pack (see the commands above)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-8b", help="model shape")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (padless's tokens_per_micro_batch)")
    p.add_argument("--padded-batch", type=int, default=16, help="examples per padded micro-batch")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state numbers")
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0, help="model init, LoRA init and pack order")
    p.add_argument("--system-timeout", type=float, default=1800.0, help="seconds before a system's row is a timeout")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--row-file", help=argparse.SUPPRESS)
    H.add_results_args(p, "train")
    args = p.parse_args(argv)
    args.systems = H.comma_choices(p, "--systems", args.systems, SYSTEMS)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from padless.shards.reader import open_shards

    manifest = open_shards(args.shards).manifest
    family, shape = H.model_shape(args.preset, int(manifest["tokenizer"]["vocab_size"]))
    gpu = H.environment()["gpu"]
    cuda = gpu != "none"
    rows = []
    for system in args.systems:
        print(f"=== {system}", flush=True)
        result = (
            {"status": why} if (why := static_status(system, cuda)) else run_system(system, argv, args.system_timeout)
        )
        rows.append({"bench": "train", "system": system, "preset": args.preset, "family": family, "shape": shape,
                     "tokens_per_step_budget": args.tokens, "warmup": args.warmup, "steps": args.steps,
                     "shards": args.shards, "shards_fingerprint": manifest.get("fingerprint"), **result})  # fmt: skip
    base = next((r["tokens_per_s"] for r in rows if r["system"] == "hf-padded" and "tokens_per_s" in r), None)
    for r in rows:
        r["vs_hf_padded"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    cols = [("system", "system", "s"), ("tokens_per_step", "tokens/step", ",.0f"), ("tokens_per_s", "tok/s", ",.0f"),
            ("trainable_tokens_per_s", "trainable tok/s", ",.0f"), ("vs_hf_padded", "vs hf-padded", ".2f"),
            ("step_s", "s/step", ".3f"), ("peak_gib", "peak GiB", ".2f"), ("losses", "loss@1", lambda x: f"{x[0]:.4f}"),
            ("losses", "loss@last", lambda x: f"{x[-1]:.4f}"), ("status", "status", "s")]  # fmt: skip
    title = f"\n{args.preset} LoRA on {gpu}: {args.warmup} warm-up + {args.steps} timed steps"
    print(H.format_table(rows, cols, title=title))
    H.record(args, "train", rows, smoke=args.preset == "tiny")


if __name__ == "__main__":
    main()
