"""Train difuse's built-in model: a small LLaDA (real LLaDA architecture and HF checkpoint format)
that answers `What is A + B?` / `What is A - B?` (0 <= A, B < 1000) through the chat template.

    python -m bench.train_tiny --out models/builtin --minutes 8 --device cuda

Objective (LLaDA SFT): per example t ~ U(0, 1), stratified over the batch; every answer token
(the integer, then EOS up to the fixed generation length) is masked with probability t, the prompt
never; loss = cross-entropy on the masked tokens weighted by 1/t, averaged over answer tokens.
Prompts are left-padded; half of the batches hide the padding from attention (the exact
equivalent of an unpadded prompt) and half let it be seen, so the model is right whichever way a
runtime batches prompts.

Progress: log lines with loss, learning rate and throughput, and a held-out accuracy with
LLaDA's fixed-schedule low-confidence decoder (one token per step, semi-autoregressive blocks).
The folder gets config.json, bf16 model.safetensors, the tokenizer, generation_config.json,
training_log.json and loss_curve.png.
"""
import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import arith_task
from difuse.models import LLaDAConfig, LLaDAModel, load_model, load_tokenizer, save_llada_checkpoint
from difuse.models.char_tokenizer import EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, save_char_tokenizer
from difuse.models.layers import Attention, SwiGLUMLP
from difuse.patterns.confidence import token_confidence, topk_select

# Generation settings the model is trained for; written to generation_config.json.
GEN_LENGTH = 8
BLOCK_LENGTH = 4
MASK_EPS = 1e-3  # LLaDA's floor on the masking probability, so 1/t stays bounded
TARGET_ACCURACY = 0.95  # held-out accuracy the shipped model must reach (fixed schedule)

SIZES = {
    # 6 x (4 * 384^2 + 3 * 384 * 1024) + 2 * 104 * 384 = 10.7 M parameters, 21 MB in bf16
    "default": dict(d_model=384, n_heads=6, n_layers=6, mlp_hidden_size=1024),
    "test": dict(d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64),
}


@dataclass
class Settings:
    size: str = "default"
    batch_size: int = 1024
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.1
    minutes: float = 8.0
    steps: int | None = None
    eval_every_s: float = 30.0
    eval_problems: int = 512
    seed: int = 0


def model_config(size: str) -> LLaDAConfig:
    return LLaDAConfig(
        **SIZES[size], vocab_size=VOCAB_SIZE, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, rope_theta=10000.0, max_sequence_length=1024,
    )


def init_weights(model: LLaDAModel) -> None:
    """GPT-2 style: N(0, 0.02) for every matrix, and the projections that write into the residual
    stream (attention output, MLP down) scaled by 1/sqrt(2 L) so the stream's variance stays flat."""
    for param in model.parameters():
        if param.dim() >= 2:  # norm weights stay at 1
            torch.nn.init.normal_(param, std=0.02)
    depth_scale = 1.0 / math.sqrt(2 * model.config.n_layers)
    for module in model.modules():
        if isinstance(module, Attention):
            module.out.weight.data.mul_(depth_scale)
        elif isinstance(module, SwiGLUMLP):
            module.down.weight.data.mul_(depth_scale)


def _positions(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(length, device=device).expand(batch, length)


def _key_mask(prompt_valid: torch.Tensor, gen_length: int) -> torch.Tensor:
    """bool [N, 1, 1, L]: True where a key may be attended (not padding)."""
    answer = torch.ones(prompt_valid.shape[0], gen_length, dtype=torch.bool, device=prompt_valid.device)
    return torch.cat([prompt_valid, answer], dim=1)[:, None, None, :]


def diffusion_loss(model, prompt, prompt_valid, answer, hide_padding: bool, generator) -> torch.Tensor:
    n, gen_length = answer.shape
    # Stratified t (one draw per 1/n-wide stratum) lowers the variance of the 1/t-weighted loss.
    offset = torch.rand(1, generator=generator, device=answer.device)
    t = ((torch.arange(n, device=answer.device) + offset) / n)[:, None]  # [N, 1], t ~ U(0, 1) per row
    p_mask = (1 - MASK_EPS) * t + MASK_EPS  # [N, 1]
    masked = torch.rand(n, gen_length, generator=generator, device=answer.device) < p_mask
    tokens = torch.cat([prompt, torch.where(masked, model.config.mask_token_id, answer)], dim=1)
    bias = _key_mask(prompt_valid, gen_length) if hide_padding else None
    hidden = model(tokens, _positions(n, tokens.shape[1], tokens.device), attention_bias=bias)
    logits = model.compute_logits(hidden[:, prompt.shape[1]:]).float()  # [N, G, V]
    ce = F.cross_entropy(logits.transpose(1, 2), answer, reduction="none")  # [N, G]
    # Masked positions only, weighted by 1/t; no boolean indexing, so no host sync.
    return (ce * masked / p_mask).sum() / (n * gen_length)


@torch.no_grad()
def decode_fixed_schedule(model, prompt, prompt_valid, gen_length: int, block_length: int) -> torch.Tensor:
    """LLaDA's reference sampler with steps = gen_length: in each block, commit the single most
    confident masked position per step (greedy). Returns the generated ids [N, gen_length]."""
    n, prompt_length = prompt.shape
    mask_id = model.config.mask_token_id
    x = torch.cat([prompt, torch.full((n, gen_length), mask_id, device=prompt.device)], dim=1)
    positions, bias = _positions(n, x.shape[1], x.device), _key_mask(prompt_valid, gen_length)
    one = torch.ones(n, dtype=torch.long, device=x.device)
    for start in range(prompt_length, prompt_length + gen_length, block_length):
        end = min(start + block_length, prompt_length + gen_length)
        for _ in range(end - start):
            hidden = model(x, positions, attention_bias=bias)
            confidence, token = token_confidence(model.compute_logits(hidden[:, start:end]))
            block = x[:, start:end].clone()
            topk_select(confidence, token, block, mask_id, one)
            x[:, start:end] = block
    return x[:, prompt_length:]


def held_out_accuracy(model, batcher, problems, autocast) -> float:
    op, a, b = (torch.tensor(column, device=batcher.device) for column in zip(*problems))
    prompt, valid = batcher.prompts(op, a, b)
    with autocast():
        generated = decode_fixed_schedule(model, prompt, valid, batcher.gen_length, BLOCK_LENGTH)
    # The answer is right when the integer's characters and the EOS padding are all exact.
    return (generated == batcher.answers(op, a, b)).all(dim=1).float().mean().item()


def lr_at(settings: Settings, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio over training progress in [0, 1]."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def train(out: str | Path, settings: Settings, device: str, log=print) -> dict:
    """Train, save the checkpoint into `out`, and return the training record."""
    out = Path(out)
    torch.manual_seed(settings.seed)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    config = model_config(settings.size)
    # Everything is written into a staging folder and moved into `out` at the end, so an
    # interrupted run never leaves a half-written checkpoint where a good one was.
    staging = out.parent / f".{out.name}.partial"
    save_char_tokenizer(staging, model_max_length=config.max_sequence_length)
    tokenizer = load_tokenizer(staging)
    batcher = arith_task.TaskBatcher(tokenizer, GEN_LENGTH, device)
    validation = arith_task.held_out_problems(settings.eval_problems, seed=settings.seed + 7)

    model = LLaDAModel(config).to(device)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.98), fused=cuda,
    )
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    log(f"model: {n_params / 1e6:.2f} M parameters ({settings.size}), batch {settings.batch_size}, "
        f"prompt {batcher.prompt_length} + answer {GEN_LENGTH} tokens, device {device}")

    budget_s = settings.minutes * 60
    history, evals = [], []
    start = last_eval = time.perf_counter()
    step, interval_loss, interval_steps = 0, torch.zeros((), device=device), 0
    while True:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / budget_s, step / settings.steps if settings.steps else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(settings, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        op, a, b = arith_task.sample_training_problems(settings.batch_size, generator, device)
        prompt, valid = batcher.prompts(op, a, b)
        with autocast():
            loss = diffusion_loss(model, prompt, valid, batcher.answers(op, a, b), step % 2 == 0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        interval_loss += loss.detach()  # summed on the device: one host sync per log line
        interval_steps += 1

        if step % 50 == 0 or step == 1 or (settings.steps and step == settings.steps):
            value = interval_loss.item() / interval_steps
            interval_loss.zero_()
            interval_steps = 0
            elapsed = time.perf_counter() - start
            history.append({"step": step, "time_s": round(elapsed, 2), "loss": value, "lr": lr})
            log(f"step {step:6d}  {elapsed:6.0f}s  loss {value:.4f}  lr {lr:.2e}  "
                f"{step * settings.batch_size / elapsed:,.0f} examples/s")
        if time.perf_counter() - last_eval >= settings.eval_every_s:
            model.eval()
            accuracy = held_out_accuracy(model, batcher, validation, autocast)
            evals.append({"step": step, "time_s": round(time.perf_counter() - start, 2), "accuracy": accuracy})
            log(f"step {step:6d}  held-out accuracy {accuracy:.3f} ({len(validation)} problems, fixed schedule)")
            last_eval = time.perf_counter()

    train_s = time.perf_counter() - start
    save_llada_checkpoint(model, staging, dtype=torch.bfloat16)
    generation = {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "steps": GEN_LENGTH,
                  "mask_token_id": MASK_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # The final score is the saved checkpoint's, loaded back through the ordinary loader.
    saved = load_model(staging, device, torch.bfloat16 if cuda else torch.float32)
    final_problems = arith_task.held_out_problems(1000, seed=arith_task.BENCH_SEED)
    final_accuracy = held_out_accuracy(saved, batcher, final_problems, autocast)
    evals.append({"step": step, "time_s": round(train_s, 2), "accuracy": final_accuracy})
    log(f"done: {step} steps in {train_s:.0f}s; saved checkpoint: held-out accuracy {final_accuracy:.3f} "
        f"on the {len(final_problems)} benchmark problems (fixed schedule, {GEN_LENGTH} steps)")
    if final_accuracy < TARGET_ACCURACY:
        log(f"warning: below the {TARGET_ACCURACY:.0%} target; train longer (--minutes) before shipping it")

    record = {"settings": asdict(settings), "device": device, "parameters": n_params, "steps": step,
              "train_seconds": round(train_s, 1), "final_accuracy": final_accuracy,
              "history": history, "evals": evals}
    (staging / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curves(record, staging / "loss_curve.png")
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(staging.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
        file.replace(out / file.name)
    staging.rmdir()
    log(f"wrote {out}")
    return record


def plot_curves(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot([h["step"] for h in record["history"]], [h["loss"] for h in record["history"]], color="tab:blue")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("masked-diffusion loss", color="tab:blue")
    loss_axis.set_yscale("log")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot([e["step"] for e in record["evals"]], [e["accuracy"] for e in record["evals"]],
                       "o-", color="tab:orange")
    accuracy_axis.set_ylabel("held-out accuracy (fixed schedule)", color="tab:orange")
    accuracy_axis.set_ylim(0, 1)
    loss_axis.set_title(f"built-in LLaDA, {record['parameters'] / 1e6:.2f} M params, {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint folder (e.g. models/builtin)")
    parser.add_argument("--minutes", type=float, default=Settings.minutes, help="training time budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (whichever first)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=Settings.size)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--eval-every", type=float, default=Settings.eval_every_s, help="seconds between evals")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    args = parser.parse_args(argv)
    settings = Settings(size=args.size, batch_size=args.batch_size, lr=args.lr, minutes=args.minutes,
                        steps=args.steps, eval_every_s=args.eval_every, seed=args.seed)
    train(args.out, settings, args.device)


if __name__ == "__main__":
    main()
