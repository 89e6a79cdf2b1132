"""The ``unsloth`` system of ``tools/bench_train.py``: Unsloth's FastLanguageModel on the hf-padded-b32 steps.

Unsloth loads models only through ``FastLanguageModel.from_pretrained(folder)``, so the worker builds the bench's
random model exactly as the ``hf`` systems do (same config, same seed, bf16 on the GPU), saves it with its tokenizer
to a temporary folder on local disk, frees it, and loads it back through Unsloth (16-bit LoRA, no 4-bit: the H200
has no bitsandbytes). LoRA r 16 / alpha 16 / dropout 0 on q,k,v,o,gate,up,down goes on with Unsloth's own
``get_peft_model`` and its gradient checkpointing (``"unsloth"``: recompute, checkpoints offloaded to the host).
Batches, steps, loss (token-loss sum / the step's trainable tokens), clipping, AdamW and timing are the shared
``_timed_loop`` on the same padded batches of 32 examples as ``hf-padded-b32``, so the two rows' losses compare.

Unsloth is not a padless dependency: it is installed offline into ``/tmp/site-unsloth`` (``UNSLOTH_SITE``) from
``.whl-unsloth/`` (``tools/unsloth_wheels.txt``), and only the worker of group ``unsloth`` sees that folder, first on
its path, because it needs ``datasets < 5`` while padless's own wheel set carries datasets 5. Every failure becomes
the row's status (which step failed, and the first line of the error), never an exception out of the bench.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["SITE", "precheck", "run_unsloth", "use_site", "worker_env"]

SITE = Path(os.environ.get("UNSLOTH_SITE", "/tmp/site-unsloth"))
REPO = Path(__file__).resolve().parents[1]
# Unsloth reads these at import: no Hugging Face calls, no statistics download (it fetches a README from the Hub
# to count environments unless told not to), and its compiled-module cache outside the checkout.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
}
CHECKPOINTING = os.environ.get("UNSLOTH_BENCH_CHECKPOINTING", "unsloth")  # "unsloth" (offloaded) or "true"


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:160]


def installed() -> bool:
    """Whether a worker with :func:`use_site` applied would find ``unsloth``."""
    return (SITE / "unsloth" / "__init__.py").is_file() or importlib.util.find_spec("unsloth") is not None


def precheck(spec: Any, cuda: bool) -> dict[str, Any] | None:
    """The row of an unsloth system that cannot run here (no GPU, not installed), or None: give it a worker."""
    if not cuda:
        status = "skipped (cpu)"
    elif not installed():
        status = f"not installed offline (no {SITE}/unsloth; install .whl-unsloth/, see tools/unsloth_wheels.txt)"
    else:
        return None
    return {"system": spec.name, "spec": asdict(spec), "status": status}


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the unsloth worker process: ``SITE`` first on PYTHONPATH (its datasets < 5 wins over
    padless's datasets 5 from interpreter start), and Unsloth's offline switches."""
    env = dict(os.environ if base is None else base)
    if SITE.is_dir():
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE)]
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), *parts])
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    return env


def use_site() -> bool:
    """Put ``SITE`` first on ``sys.path`` in this process (the worker; a no-op when it is not there)."""
    if not SITE.is_dir():
        return False
    with contextlib.suppress(ValueError):
        sys.path.remove(str(SITE))
    sys.path.insert(0, str(SITE))
    return True


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


@contextlib.contextmanager
def _no_shell(refused: list[str]):
    """Unsloth runs ``ldconfig`` through ``os.system`` at import when bitsandbytes is missing and it runs as root;
    a benchmark must not relink a lent machine's libraries, so record the command instead of running it."""
    real = os.system

    def refuse(cmd: str) -> int:
        refused.append(str(cmd))
        return 0

    os.system = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        os.system = real  # type: ignore[assignment]


def _tokenizer_dirs(ss: Any) -> list[Path]:
    name = (ss.manifest.get("tokenizer") or {}).get("name") or ""
    out = [Path(os.environ["UNSLOTH_BENCH_TOKENIZER"])] if os.environ.get("UNSLOTH_BENCH_TOKENIZER") else []
    if name:
        shards_dir = Path(str(getattr(ss, "path", "") or "."))
        out += [REPO / ".whl-unsloth" / "tokenizer" / name, shards_dir.parent / "tokenizers" / name,
                REPO.parent / "shared" / "data" / "tokenizers" / name]  # fmt: skip
    return out


def _save_tokenizer(ss: Any, folder: Path) -> str:
    """Save the shards' tokenizer into the model folder (Unsloth loads one from there); when none is reachable, a
    3-token stand-in (the batches are token ids already: only Unsloth's loader reads it)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for path in _tokenizer_dirs(ss):
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(str(path), local_files_only=True).save_pretrained(str(folder))
            return str(path)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")  # fmt: skip
    tok.save_pretrained(str(folder))
    return "stand-in (3 tokens; the shards' tokenizer was not found)"


TMP_PREFIX = "bench-unsloth-"


def _clean_stale(root: Path) -> None:
    """Remove model folders of earlier unsloth workers that were killed (a timeout's SIGKILL skips ``finally``):
    each holds a 16 GB checkpoint on the machine's small disk."""
    for old in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)


def _say(phase: str, t0: float) -> None:
    print(f"    [unsloth] {phase} (+{time.perf_counter() - t0:.1f} s)", flush=True)


def run_unsloth(cfg: Any, spec: Any, ss: Any) -> dict[str, Any]:
    """Build, save, load through Unsloth, train and time one unsloth system; failures are the row's status."""
    row: dict[str, Any] = {"system": spec.name, "spec": asdict(spec), "status": "ok"}
    phase = "import torch"
    tmp: Path | None = None
    start = time.perf_counter()
    try:
        import torch

        if not torch.cuda.is_available():
            return {**row, "status": "skipped (cpu)"}
        device = torch.device("cuda")
        row["gpu"] = torch.cuda.get_device_name(device)
        if cfg.deadline and time.time() > cfg.deadline:
            return {**row, "status": "skipped (--time-budget spent)"}
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        root = Path(os.environ.get("UNSLOTH_BENCH_TMP") or tempfile.gettempdir())
        _clean_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(tmp / "compiled"))
        row["site"] = str(SITE) if str(SITE) in sys.path else "(not on sys.path)"
        row["versions"] = {n: _version(n) for n in ("unsloth", "unsloth_zoo", "datasets", "trl", "transformers")}
        row["versions"]["datasets_path"] = str(getattr(importlib.util.find_spec("datasets"), "origin", None))

        phase = "import unsloth"  # before transformers (Unsloth patches it at import)
        _say(phase, start)
        refused: list[str] = []
        with _no_shell(refused):
            import unsloth  # noqa: F401
            from unsloth import FastLanguageModel
        if refused:
            row["refused_shell"] = refused

        from bench_train_data import make_example_steps, make_steps, shards_vocab_size
        from bench_train_systems import (
            LORA_TARGETS,
            _build_model,
            _free,
            _hf_loss_fn,
            _micro_batches,
            _summarise,
            _timed_loop,
            model_config,
        )

        phase = "data"
        _say(phase, start)
        mcfg, notes = model_config(cfg.model_shape, shards_vocab_size(ss), tiny=cfg.tiny)
        count = spec.warmup + spec.steps
        if cfg.padded_steps == "examples":
            steps = make_example_steps(ss, seed=cfg.seed, per_step=spec.batch_size, count=count)
            row["plan"] = f"{spec.batch_size} ex"
        else:
            steps = make_steps(ss, seed=cfg.seed, budget=spec.plan_tokens, count=count)
            row["plan"] = f"{spec.plan_tokens} tok"
        batches = _micro_batches(spec, steps, cfg, pin=True)

        phase = "build + save_pretrained"  # the hf systems' exact weights, through a folder (Unsloth's only door)
        _say(phase, start)
        _free(device)
        t0 = time.perf_counter()
        folder = tmp / "model"
        model = _build_model(mcfg, "sdpa", device, torch.bfloat16, cfg.seed)
        model.save_pretrained(str(folder))
        del model
        _free(device)
        row["tokenizer"] = _save_tokenizer(ss, folder)
        row["build_s"] = time.perf_counter() - t0

        phase = "FastLanguageModel.from_pretrained"
        _say(phase, start)
        t0 = time.perf_counter()
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(folder), max_seq_length=ss.max_len, dtype=torch.bfloat16, load_in_4bit=False,
            local_files_only=True,
        )  # fmt: skip
        row["load_s"] = time.perf_counter() - t0

        phase = "FastLanguageModel.get_peft_model"
        _say(phase, start)
        checkpointing: Any = CHECKPOINTING if CHECKPOINTING == "unsloth" else True
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
            use_gradient_checkpointing=checkpointing, random_state=cfg.seed + 1,
            temporary_location=str(tmp / "buffers"),
        )  # fmt: skip
        notes.append(f"Unsloth gradient checkpointing {checkpointing!r}; LoRA init random_state {cfg.seed + 1}")

        phase = "train"
        _say(phase, start)
        if hasattr(FastLanguageModel, "for_training"):  # Unsloth's own switch (flags its fast paths for training)
            FastLanguageModel.for_training(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)
        row["trainable_params"] = sum(p.numel() for p in params)
        torch.cuda.reset_peak_memory_stats(device)  # the peak below includes the weights, not the init
        run = _hf_loss_fn(model, device)
        losses, times, norms, _ = _timed_loop(model, run, batches, steps, device, params, opt, None)
        row.update(_summarise(spec, steps, batches, losses, times, norms, mcfg, cfg, device))
        row["notes"] = notes
    except (Exception, SystemExit) as error:  # one system's failure is its row
        import traceback

        traceback.print_exc()
        oom = type(error).__name__ == "OutOfMemoryError"
        if oom:
            import torch

            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["status"] = f"OOM in {phase} (peak {row['peak_gib']:.1f} GiB): {_first_line(error)}"
        else:
            row["status"] = f"{phase} failed: {_first_line(error)}"
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return row
