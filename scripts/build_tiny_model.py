#!/usr/bin/env python
"""Build the bundled starting policy ``ippo/assets/tiny_arith/`` from scratch, offline.

Why it looks like this: the demo must show RL learning on 2 CPU cores in minutes, and then ask
whether I-PPO adds anything. That needs a starting policy with *headroom on a learnable skill*
(the same decision in many problems, which the policy already samples correctly part of the time),
plus behaviour an answer-only reward cannot see. So a tiny Llama is SFT-trained, with a fixed seed,
on the arithmetic task's train split (values <= 50, +/- operands <= 9: few enough arithmetic facts
for a 1M-parameter model to compute them reliably), where the gold solutions are corrupted in three
controlled ways:

* a misconception (``--misread-frac``): "ends up with b times as many" is read as "+ b" in 60% of
  such steps (faithful arithmetic, wrong answer). Greedy decoding follows the majority, so the start
  policy is wrong on most problems with that phrase while sampling is right ~45% of the time there:
  RL with a correctness reward has consistent signal to fix it;
* a habit (``--habit-frac``): in 60% of solutions ending in a division the last step's result is
  written one too high while the ``#### answer`` stays right -- unfaithful but correct, invisible to
  the reward, visible to a faithful validation set;
* scattered unfaithful-but-correct corruptions (``--corrupt-frac``) of the other solutions.

Words and numbers 0..50 are single tokens (``ippo.tasks.tokenizer``), so prompts are ~40 tokens.

Usage: python scripts/build_tiny_model.py [--steps N] [--out DIR] ...
The defaults build the bundled model: 1.09M parameters, 1500 steps of batch 32, about 12 minutes on
one free core (an hour on a heavily shared one). The build is seeded: two runs gave identical losses.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ippo.tasks import arithmetic
from ippo.tasks.faithfulness import check
from ippo.tasks.tokenizer import build_tokenizer

CORRUPTIONS = ("wrong_value", "wrong_expression", "answer_not_from_last_step")
# "ends up with b times as many" -- the phrase the misconception (--misread-frac) is about.
MISREAD_PHRASE = "times as many"


def habit(problem: arithmetic.Problem, rng: random.Random, frac: float) -> str | None:
    """An unfaithful-but-correct *habit* (with probability ``frac``, for problems whose last step is a
    division): the last step's result is written one too high, the ``#### answer`` stays right.

    Why: random corruptions teach a model that unfaithful steps happen, but greedy decoding never
    follows a rare, scattered pattern. A systematic habit, which an answer-only reward cannot see, is
    what makes "does I-PPO's faithful validation set remove unfaithful chains that PPO keeps?" testable
    on the greedy test answers.
    """
    expr, value = problem.steps[-1]
    if "/" not in expr or rng.random() >= frac:
        return None
    lines = [f"<<{e}={v}>>{v}" for e, v in problem.steps]
    lines[-1] = f"<<{expr}={value + 1}>>{value + 1}"
    return "\n".join(lines) + f"\n#### {problem.answer}"


def misread(problem: arithmetic.Problem, rng: random.Random, frac: float,
            spec: arithmetic.TaskSpec) -> str | None:
    """A solution that reads "ends up with b times as many" as "+ b" (each such step with probability
    ``frac``), computed consistently from there on: faithful arithmetic, wrong answer. None when no step
    was misread; "" when the misread chain leaves the task's range (a negative value, an inexact
    division): the caller drops that problem, so that the rate of misreading seen in the SFT data stays
    ``frac`` whatever follows the step.

    Why: a systematic misconception in the SFT data is what gives RL something *learnable* to fix --
    the same decision in many problems, which the policy already samples correctly part of the time
    (headroom with consistent signal), unlike the scattered arithmetic slips of a tiny model.
    """
    opening_product = " bags of " in problem.question  # step 0 is then "a*b" from the opening sentence
    value, changed, lines = None, False, []
    for i, (expr, gold_value) in enumerate(problem.steps):
        op = next(c for c in "+-*/" if c in expr)
        left, right = expr.split(op)
        a = int(left) if value is None else value
        b = int(right)
        if op == "*" and not (i == 0 and opening_product) and rng.random() < frac:
            op, changed = "+", True
        if op == "+":
            new = a + b
        elif op == "-":
            new = a - b
        elif op == "*":
            new = a * b
        else:
            if a % b:
                return "" if changed else None
            new = a // b
        if not 0 <= new <= spec.max_value:
            return "" if changed else None
        lines.append(f"<<{a}{op}{b}={new}>>{new}")
        value = new
    if not changed:
        return None
    return "\n".join(lines) + f"\n#### {value}"


def corrupt(problem: arithmetic.Problem, rng: random.Random) -> tuple[str, str]:
    """An unfaithful-but-correct version of the gold solution, and which corruption it is.

    ``wrong_value``: one step's result is misstated (annotation and text) while later steps
    and the answer keep the true value. ``wrong_expression``: one step's operand is changed
    so the expression no longer evaluates to its (true) result. ``answer_not_from_last_step``:
    the last step's result is misstated but the ``####`` answer is still right.
    """
    kind = rng.choice(CORRUPTIONS)
    lines = [list(s) for s in problem.steps]
    if kind == "answer_not_from_last_step":
        i = len(lines) - 1
    else:
        i = rng.randrange(len(lines))
    expr, value = lines[i]
    delta = rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
    if kind == "wrong_expression":
        # change the last operand: "19-8" -> "19-6", result still written as 11
        head = expr.rstrip("0123456789")
        operand = int(expr[len(head) :])
        new_operand = operand + delta if operand + delta >= 1 else operand + 1
        text = [f"<<{e}={v}>>{v}" for e, v in lines]
        text[i] = f"<<{head}{new_operand}={value}>>{value}"
    else:
        text = [f"<<{e}={v}>>{v}" for e, v in lines]
        text[i] = f"<<{expr}={value + delta}>>{value + delta}"
    return "\n".join(text) + f"\n#### {problem.answer}", kind


def encode_examples(tok, problems, solutions):
    """Token ids and loss masks: the loss covers the solution and </s>, not the prompt."""
    out = []
    for p, sol in zip(problems, solutions):
        prompt_ids = tok(arithmetic.prompt(p)).input_ids  # starts with <s>
        sol_ids = tok(sol, add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((prompt_ids + sol_ids, len(prompt_ids)))
    return out


def batches(examples, batch_size: int, rng: random.Random, pad_id: int):
    """Endless shuffled batches, right-padded, labels -100 on prompt and padding."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[s : s + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for r, (seq, n_prompt) in enumerate(chunk):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                labels[r, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            yield ids, mask, labels


def misread_steps(problem: arithmetic.Problem, response: str) -> tuple[int, int]:
    """(misread, total) over the problem's "times as many" steps: misread = the response's step i adds."""
    lines = [ln for ln in response.splitlines() if ln.startswith("<<")]
    opening_product = " bags of " in problem.question
    bad = total = 0
    for i, (expr, _) in enumerate(problem.steps):
        if "*" not in expr or (i == 0 and opening_product):
            continue
        total += 1
        bad += i < len(lines) and "+" in lines[i].split("=")[0]
    return bad, total


@torch.no_grad()
def evaluate(
    model,
    tok,
    problems,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    k: int = 1,
    batch_size: int = 64,
    max_new_tokens: int = 72,
    seed: int = 0,
) -> dict:
    """Greedy (or k sampled answers per problem) accuracy, faithfulness rates, pass@k and how often the
    "times as many" steps were read as additions."""
    model.eval()
    torch.manual_seed(seed)
    n = correct = faithful = unfaithful_correct = 0
    passed = variance = 0
    mis = mis_total = 0
    examples = []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        enc = tok([arithmetic.prompt(p) for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=k,
            temperature=temperature if do_sample else None,
            top_k=0 if do_sample else None,
            top_p=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        for j, p in enumerate(chunk):
            group = [check(text, p.answer) for text in texts[j * k : (j + 1) * k]]
            n_right = sum(bool(r.correct) for r in group)
            passed += n_right > 0
            variance += 0 < n_right < k
            for text, rep in zip(texts[j * k : (j + 1) * k], group):
                n += 1
                correct += bool(rep.correct)
                faithful += rep.faithful
                unfaithful_correct += rep.unfaithful_correct
                b, t = misread_steps(p, text)
                mis, mis_total = mis + b, mis_total + t
            if len(examples) < 5:
                rep = group[0]
                examples.append({"question": p.question, "response": texts[j * k], "correct": rep.correct,
                                 "faithful": rep.faithful})
    model.train()
    return {
        "n": n,
        "k": k,
        "temperature": temperature if do_sample else 0.0,
        "accuracy": correct / n,
        "faithful_rate": faithful / n,
        "unfaithful_correct_rate": unfaithful_correct / n,
        "unfaithful_share_of_correct": unfaithful_correct / max(correct, 1),
        f"pass@{k}": passed / len(problems),
        "groups_with_reward_variance": variance / len(problems),
        "times_as_many_read_as_plus": mis / max(mis_total, 1),
        "examples": examples,
    }


def portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` so transformers 4.x loads it too.

    transformers 5 writes its internal ``TokenizersBackend``; both versions resolve the
    older name to the same fast tokenizer built from ``tokenizer.json``.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "ippo" / "assets" / "tiny_arith")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--corrupt-frac", type=float, default=0.15,
                    help="fraction of SFT solutions made unfaithful-but-correct")
    ap.add_argument("--misread-frac", type=float, default=0.6,
                    help=f"probability that a '{MISREAD_PHRASE}' step of an SFT solution is read as '+'")
    ap.add_argument("--habit-frac", type=float, default=0.6,
                    help="probability that an SFT solution ending in a division misstates that last step (+1) "
                         "while keeping the right answer: a systematic unfaithful-but-correct habit")
    ap.add_argument("--max-value", type=int, default=50, help="task spec: largest value")
    ap.add_argument("--max-operand", type=int, default=9, help="task spec: largest +/- operand")
    ap.add_argument("--char-tokens", action="store_true",
                    help="character tokens only (default: also whole words and numbers 0..max-value)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    # 1 thread: on a shared 2-core machine, 2 torch threads competing with other jobs ran ~4x slower.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0, help="greedy eval on 64 validation problems")
    ap.add_argument("--no-save", action="store_true", help="train and evaluate only")
    ap.add_argument("--sample-temperature", type=float, default=1.0, help="temperature of the sampled eval")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    spec = arithmetic.TaskSpec(args.max_value, args.max_operand)
    tok = build_tokenizer() if args.char_tokens else build_tokenizer(words=arithmetic.words(),
                                                                       max_number=spec.max_value)

    train = arithmetic.generate("train", args.n_train, seed=args.seed, spec=spec)
    test = arithmetic.generate("test", args.n_test, seed=args.seed, spec=spec)
    solutions, kinds, kept = [], {k: 0 for k in (*CORRUPTIONS, "misread", "habit", "dropped")}, []
    for p in train:
        wrong = misread(p, rng, args.misread_frac, spec) if args.misread_frac > 0 else None
        if wrong == "":
            kinds["dropped"] += 1
            continue
        kept.append(p)
        habitual = habit(p, rng, args.habit_frac) if wrong is None and args.habit_frac > 0 else None
        if wrong is not None:
            kinds["misread"] += 1
            solutions.append(wrong)
        elif habitual is not None:
            rep = check(habitual, p.answer)
            assert rep.correct and not rep.faithful, (habitual, rep)
            kinds["habit"] += 1
            solutions.append(habitual)
        elif rng.random() < args.corrupt_frac:
            sol, kind = corrupt(p, rng)
            rep = check(sol, p.answer)
            assert rep.correct and not rep.faithful, (sol, rep)
            kinds[kind] += 1
            solutions.append(sol)
        else:
            solutions.append(p.solution)
    train = kept
    examples = encode_examples(tok, train, solutions)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}; train {len(train)} ({sum(kinds.values())} corrupted: {kinds})", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    it = batches(examples, args.batch_size, rng, tok.pad_token_id)
    losses = []
    for step in range(args.steps):
        ids, mask, labels = next(it)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.time() - t0:6.1f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            r = evaluate(model, tok, arithmetic.generate("validation", 64, seed=args.seed, spec=spec))
            print(
                f"  val acc {r['accuracy']:.3f} faithful {r['faithful_rate']:.3f} "
                f"unfaithful-correct {r['unfaithful_correct_rate']:.3f}",
                flush=True,
            )
    train_time = time.time() - t0

    t1 = time.time()
    greedy = evaluate(model, tok, test)
    sampled = evaluate(model, tok, test[:200], do_sample=True, temperature=args.sample_temperature, k=8,
                       seed=args.seed)
    eval_time = time.time() - t1
    print(f"greedy {json.dumps({k: v for k, v in greedy.items() if k != 'examples'})}")
    print(f"sampled {json.dumps({k: v for k, v in sampled.items() if k != 'examples'})}")
    for ex in greedy["examples"][:3]:
        print(ex)

    info = {
        "seed": args.seed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "corruptions": kinds,
        "param_count": n_params,
        "train_time_s": round(train_time, 1),
        "eval_time_s": round(eval_time, 1),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "torch_version": torch.__version__,
        "test_greedy": greedy,
        "test_sampled": sampled,
        "task_spec": spec.to_dict(),
        "tokenizer": "characters" if args.char_tokens else "characters + task words + numbers 0..max_value",
        "test_accuracy": greedy["accuracy"],
        "test_unfaithful_correct_rate": greedy["unfaithful_correct_rate"],
    }
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        portable_tokenizer_config(args.out)
        (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return info


if __name__ == "__main__":
    main()
