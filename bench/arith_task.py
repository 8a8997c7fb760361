"""The built-in model's task: `What is A + B?` / `What is A - B?` with integers 0 <= A, B < 1000,
answered with the integer alone (negative allowed), asked through the chat template.

A problem is (op, a, b) with op 0 for `+` and 1 for `-`. A fixed hash of the problem puts 1/64 of
all problems in a held-out split that training never samples; evaluation draws from it.

`TaskBatcher` builds token batches on the device without the tokenizer in the loop: it asks the
tokenizer once for the chat-template prefix and suffix and the character ids, then assembles
`[pad.. | prompt | answer | EOS..]` rows with tensor ops. Tests check it against `encode_prompt`.
"""
import random
import re

import torch

from difuse.models import encode_prompt

OPERAND_LIMIT = 1000
OPERATORS = ("+", "-")
HELD_OUT_MODULUS = 64
BENCH_SEED = 1234  # the fixed held-out problems of bench.quality and the final training eval
MAX_ANSWER_CHARS = 4  # "-999" and "1998"


def question(op: int, a: int, b: int) -> str:
    return f"What is {a} {OPERATORS[op]} {b}?"


def solution(op: int, a: int, b: int) -> int:
    return a + b if op == 0 else a - b


def parse_answer(text: str) -> int | None:
    """The integer the model answered, or None when the reply is not exactly one integer."""
    match = re.fullmatch(r"\s*(-?\d+)\s*", text)
    return int(match.group(1)) if match else None


def _problem_hash(key):
    """A 32-bit integer mix (works on Python ints and int64 tensors alike, without overflow)."""
    key = key & 0xFFFFFFFF
    key = ((key >> 16) ^ key) * 0x45D9F3B & 0xFFFFFFFF
    key = ((key >> 16) ^ key) * 0x45D9F3B & 0xFFFFFFFF
    return (key >> 16) ^ key


def _problem_key(op, a, b):
    return (op * OPERAND_LIMIT + a) * OPERAND_LIMIT + b


def is_held_out(op, a, b):
    """True for problems reserved for evaluation. Accepts ints or int64 tensors."""
    return _problem_hash(_problem_key(op, a, b)) % HELD_OUT_MODULUS == 0


def held_out_problems(n: int, seed: int = BENCH_SEED) -> list[tuple[int, int, int]]:
    """n distinct held-out problems (op, a, b), the same for a given seed."""
    rng, chosen = random.Random(seed), {}
    limit = 2 * OPERAND_LIMIT**2 // HELD_OUT_MODULUS
    if n > limit // 2:
        raise ValueError(f"at most {limit // 2} held-out problems can be drawn, asked for {n}")
    while len(chosen) < n:
        problem = (rng.randrange(2), rng.randrange(OPERAND_LIMIT), rng.randrange(OPERAND_LIMIT))
        if is_held_out(*problem):
            chosen[problem] = None
    return list(chosen)


def _first_training_problem() -> tuple[int, int, int]:
    return next((op, a, b) for op in range(2) for a in range(OPERAND_LIMIT) for b in range(OPERAND_LIMIT)
                if not is_held_out(op, a, b))


def sample_training_problems(n: int, generator: torch.Generator, device, tries: int = 4) -> tuple[torch.Tensor, ...]:
    """n uniformly drawn problems outside the held-out split, as int64 tensors (op, a, b).

    Without a host sync: each row takes the first of `tries` draws that is not held out; a row
    whose draws are all held out (probability 64**-tries) becomes a fixed training problem."""
    draws = [torch.randint(0, high, (n, tries), generator=generator, device=device)
             for high in (2, OPERAND_LIMIT, OPERAND_LIMIT)]
    allowed = ~is_held_out(*draws)  # [n, tries]
    first = allowed.int().argmax(dim=1, keepdim=True)  # index of the first allowed draw
    fallback = _first_training_problem()
    return tuple(torch.where(allowed.any(dim=1), d.gather(1, first).squeeze(1), f) for d, f in zip(draws, fallback))


class TaskBatcher:
    """Token batches for the task, built on `device` from the tokenizer's own encodings."""

    def __init__(self, tokenizer, gen_length: int, device):
        if gen_length < MAX_ANSWER_CHARS + 1:
            raise ValueError(f"gen_length {gen_length} cannot hold a {MAX_ANSWER_CHARS}-character answer and EOS")
        self.gen_length, self.device = gen_length, device
        self.eos_id, self.pad_id, self.mask_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id
        if None in (self.eos_id, self.pad_id, self.mask_id):
            raise ValueError("the tokenizer needs eos, pad and mask tokens")

        def ids(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        char_ids = {c: ids(c) for c in "0123456789-+ "}
        if any(len(v) != 1 for v in char_ids.values()) or ids("12 + 3") != [char_ids[c][0] for c in "12 + 3"]:
            raise ValueError("TaskBatcher needs a character-level tokenizer (one token per digit and sign)")
        sample = question(0, 12, 3)
        full, body = encode_prompt(tokenizer, sample), ids(sample)
        start = next(i for i in range(len(full)) if full[i:i + len(body)] == body)
        # prompt = prefix + ids("What is ") + a + op + b + ids("?") + suffix
        self.head = torch.tensor(full[:start] + ids("What is "), device=device)
        self.tail = torch.tensor(ids("?") + full[start + len(body):], device=device)
        self.operator_ids = torch.tensor([ids(f" {o} ") for o in OPERATORS], device=device)  # [2, 3]
        self.digit_ids = torch.tensor([char_ids[str(d)][0] for d in range(10)], device=device)
        self.minus_id = char_ids["-"][0]
        self.prompt_length = len(self.head) + 3 + 3 + 3 + len(self.tail)  # longest prompt

    def _number_slots(self, value: torch.Tensor, width: int) -> torch.Tensor:
        """Integers [N] -> their character ids [N, width], left-aligned, -1 in unused slots."""
        magnitude = value.abs()
        n_digits = torch.ones_like(value)
        for power in range(1, width):
            n_digits += (magnitude >= 10**power).long()
        negative = (value < 0).long()
        length = n_digits + negative
        slot = torch.arange(width, device=value.device)  # [width]
        digit_index = n_digits[:, None] - 1 - (slot[None, :] - negative[:, None])  # power of ten per slot
        digits = (magnitude[:, None] // 10 ** digit_index.clamp(min=0)) % 10
        out = self.digit_ids[digits]
        out = torch.where((slot[None, :] == 0) & (negative[:, None] == 1), self.minus_id, out)
        return torch.where(slot[None, :] < length[:, None], out, -1)

    def prompts(self, op, a, b) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (left-padded prompt ids [N, prompt_length], prompt validity mask [N, prompt_length])."""
        n = op.shape[0]
        pieces = torch.cat([
            self.head.expand(n, -1), self._number_slots(a, 3), self.operator_ids[op],
            self._number_slots(b, 3), self.tail.expand(n, -1),
        ], dim=1)  # [N, prompt_length] with -1 in unused number slots
        valid = pieces >= 0
        # A stable sort on validity moves the unused slots to the left, keeping the token order.
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
        pieces, valid = pieces.gather(1, order), valid.gather(1, order)
        return torch.where(valid, pieces, self.pad_id), valid

    def answers(self, op, a, b) -> torch.Tensor:
        """-> answer ids [N, gen_length]: the integer's characters, then EOS to the end."""
        value = torch.where(op == 0, a + b, a - b)
        slots = self._number_slots(value, MAX_ANSWER_CHARS)
        answer = torch.full((op.shape[0], self.gen_length), self.eos_id, device=op.device)
        answer[:, :MAX_ANSWER_CHARS] = torch.where(slots >= 0, slots, self.eos_id)
        return answer
