"""What a run can be configured with: nested dataclasses, every field with its default and what it means.

Loading (YAML + ``key=value`` overrides) and validation live in ``ippo.rl.config``; this module imports
nothing of the trainer, so every module may use these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # local HF directory; "builtin:tiny-llama" (random ~60k-param Llama, CPU tests); "builtin:tiny-arith"
    # (the bundled task model); "package:<module>" (a model shipped inside an installed Python package)
    path: str = ""
    gguf_file: str | None = None  # file name inside `path`, loaded through transformers' GGUF support
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (falls back to sdpa if missing)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    ref_offload: bool = False  # keep the frozen reference on CPU between uses (GPU memory)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # module names (or name suffixes) that get adapters; None = PEFT's default for the architecture
    # (Llama/Qwen2: q_proj, v_proj; GPT-2: c_attn); names that match no module of the model are an error
    lora_target_modules: list[str] | None = None


@dataclass
class DataConfig:
    # Each path: a JSONL file (read without `datasets`), a .parquet/.json/.csv/.arrow file, a `save_to_disk`
    # directory, or a script-free dataset folder (e.g. data/train-*.parquet) read by datasets.load_dataset.
    train_path: str = ""  # question/answer rows (GSM8K style)
    val_path: str = ""  # gold solutions for the validation gradient; "" = hold out `val_holdout` train rows
    test_path: str = ""  # evaluation split; "" = no evaluation
    # the split of a multi-split source; "" = its only split, else train / validation / test
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    question_field: str = "question"  # column (JSON key) of the question
    answer_field: str = "answer"  # column of the gold solution (its final answer after `#### `, or boxed)
    # read rows lazily (datasets streaming): max_*_rows reads only those rows, and no Arrow cache copy is
    # written; JSONL is always read line by line
    streaming: bool = False
    val_holdout: int = 0  # rows taken from the end of train when val_path is empty
    prompt_template: str = "Question: {question}\nAnswer:"
    chat_template: bool = False  # wrap the prompt with the tokenizer's chat template
    strip_calculator: bool = True  # remove GSM8K's <<a*b=c>> annotations from gold solutions
    max_prompt_tokens: int = 512  # longer prompts are an error (listed before training starts)
    max_train_rows: int = 0  # 0 = all
    max_test_rows: int = 0


@dataclass
class VLLMConfig:
    """The colocated vLLM rollout engine (``rollout.engine=vllm``, ``pip install -e .[vllm]``; ippo/vllm_rollout.py)."""

    # share of the GPU's *total* memory vLLM takes (its weights + KV cache) while awake; the trainer's
    # policy, critic, reference and optimizer state must fit in the rest
    gpu_memory_utilization: float = 0.3
    # between rollouts: 0 = stay awake; 1 = offload vLLM's weights to CPU and free the KV cache; 2 = free
    # both (the weight sync rewrites every weight before the next rollout; not with model.lora)
    sleep_level: int = 1
    max_model_len: int = 0  # 0 = data.max_prompt_tokens + rollout.max_new_tokens
    enforce_eager: bool = False  # True: no CUDA graphs (faster start, slower decoding)


@dataclass
class RolloutConfig:
    prompts_per_iter: int = 32  # B, global (over all ranks)
    samples_per_prompt: int = 8  # n
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    # hf: the policy's own generate(); vllm: a colocated vLLM engine that receives the policy's weights
    # before every rollout and samples each episode with its own seed (ippo/vllm_rollout.py)
    engine: str = "hf"
    gen_batch_prompts: int = 0  # hf: prompts per generate() call; 0 = all of this rank's prompts at once
    seed_per_prompt: bool = False  # hf: one generate() per prompt seeded by (seed, iter, prompt): batch-invariant
    forward_batch: int = 16  # episodes per forward in the log-prob / value / scoring passes
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # DAPO's dynamic sampling: after the iteration's prompts, draw further rounds of prompts_per_iter prompts
    # (prompts and sampling seeds from (seed, iteration, round)) until prompts_per_iter groups have rewards
    # that differ, at most max_sample_rounds rounds in all (the first included); the batch is the first
    # prompts_per_iter such groups, topped up with the earliest zero-variance groups when the rounds run out
    dynamic_sampling: bool = False
    max_sample_rounds: int = 4


@dataclass
class RewardConfig:
    fn: str = "auto"  # auto | gsm8k | boxed | math_verify | contains | module:function
    truncated_reward: float | None = None  # reward of responses that never emit EOS (None = parse them)


@dataclass
class PPOConfig:
    # gae | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline (ippo/rl/advantages.py)
    advantage: str = "gae"
    # The GAE critic. separate: a copy of the policy's backbone with a scalar head (its own forward and
    # backward). shared: a scalar head on the policy's final hidden state; its values come from the
    # rollout's and the update's own policy forwards, and the value loss also trains the policy trunk.
    critic: str = "separate"
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    epochs: int = 2
    mini_batch_size: int = 64  # episodes per optimizer step (global)
    micro_batch_size: int = 8  # episodes per forward/backward (per rank)
    lr: float = 1e-6
    value_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 0  # linear LR warmup, in optimizer steps
    clip: float = 0.2
    # asymmetric clip range [1 - clip_low, 1 + clip_high] of the ratio (None: = clip; DAPO's clip-higher: 0.28)
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None  # c > 1: the loss of a negative-advantage token is at most -c A (None: off)
    value_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"  # k1 | k3
    kl_in_reward: bool = False  # False: KL is a loss term (authors); True: per-token reward penalty
    entropy_coef: float = 0.0  # entropy is always logged; a bonus only when > 0
    # token_mean | seq_mean (of per-sequence token means) | seq_mean_token_sum (of per-sequence token sums) |
    # token_sum_norm (Dr. GRPO: token sum / (loss_norm_len x sequences))
    loss_agg: str = "token_mean"
    loss_norm_len: int | None = None  # token_sum_norm's constant length; None = rollout.max_new_tokens
    # Off-policy correction of rollout.engine=vllm's samples (the engine's log-probs differ from the trainer's):
    # none | tis (weight min(pi_old / pi_vllm, is_cap)) | mis (weight 1 when pi_old / pi_vllm <= is_cap, else 0),
    # per token or per sequence (is_level: token | sequence), on the policy loss (and I-PPO's episode loss)
    is_correction: str = "none"
    is_level: str = "token"
    is_cap: float = 2.0
    max_grad_norm: float = 1.0
    # An optimizer step whose loss or gradient norm is NaN/Inf is skipped (weights, optimizer and LR schedule
    # untouched) and counted; this many skipped steps in a row stop the run (the weights did not change in
    # between, so they keep failing: the run diverged).
    max_nonfinite_steps: int = 3
    grpo_eps: float = 1e-6


@dataclass
class InfluenceConfig:
    enabled: bool = True  # False = plain PPO
    mode: str = "exact"  # exact | sketch | target
    rank: int = 64  # sketch / target rank
    # mode=target: how the rank-q basis of the validation gradient G is built. factor: from each layer's
    # validation (X, dY), never forming G (memory: the validation activations + O(q (d_in + d_out)) per
    # layer); dense: from G itself (4 bytes per hooked parameter). exact/sketch modes always form G.
    target_basis: str = "factor"
    backend: str = "auto"
    n_val: int = 100  # validation examples drawn each iteration (seeded)
    filter: str = "threshold"  # threshold | bottom_fraction | negative_bottom_fraction
    threshold: float = 0.0  # threshold rule: keep score > threshold
    fraction: float = 0.5  # (negative_)bottom_fraction: fraction dropped
    reweight: bool = True  # w_e = score_e / mean(kept scores); False = weight 1
    on_empty: str = "stop"  # stop | skip
    # before_update (the paper): score every episode at theta_old in a separate pass before the PPO epochs.
    # in_update: in the first PPO epoch, score each micro-batch at the current parameters inside its own
    # backward and reweight it there (engine.weighted_backward): I-PPO for the FLOPs of PPO; later epochs
    # reuse that selection. KL/entropy/value terms stay unweighted through a second gradient stream; the
    # validation gradient is taken once per iteration at theta_old.
    timing: str = "before_update"
    # What an episode's loss L_e is, for its score and for its weight. pg: its share of the clipped
    # surrogate only (the paper; KL and entropy terms stay unweighted). policy: the surrogate plus its
    # KL-penalty and entropy terms, scored and weighted together -- with KL as a loss term this lets
    # in_update run ONE backward through the policy instead of a weighted and an unweighted one.
    # all: policy plus the episode's value loss (vf_coef * its share), for ppo.critic=shared, where the
    # value loss reaches the policy's trunk: in_update then needs one backward for policy and critic.
    episode_loss: str = "pg"
    val_batch: int = 0  # validation examples per target backward: 0 = all (one backward)
    top_k_log: int = 5  # proponents/opponents recorded per iteration
    # A practical early stop beside the paper's (an empty buffer, on_empty=stop): stop once the kept fraction has
    # been below stop_kept_frac for stop_patience iterations in a row (0 = off). The iteration that completes the
    # streak still trains; the stop is recorded like every stop (metrics' stop_reason, state.json's stopped).
    stop_kept_frac: float = 0.0
    stop_patience: int = 3


@dataclass
class ControlConfig:
    """Controls: what I-PPO must beat before its effect is credited to influence (ippo/rl/filters.py, gold_sft.py)."""

    # none | zero_variance (drop prompts whose samples all got the same reward: DAPO's filter) |
    # random (keep as many episodes per iteration as the I-PPO run `match_run` kept, drawn at random) |
    # max_variance (PODS: that many episodes, spread over the prompts, each prompt's max-reward-variance samples)
    filter: str = "none"
    match_run: str = ""  # random, max_variance: the I-PPO run directory to match (its influence.jsonl)
    # random, max_variance: matched (that run's kept weights, in random order) | uniform (1)
    weights: str = "matched"
    # random: informative (non-zero-advantage episodes first) | all; max_variance: informative (prompts whose
    # rewards differ get the budget first) | all (spread over every prompt)
    pool: str = "informative"
    # The gold-data control: add sft_coef x the SFT loss (token mean) on exactly the gold validation solutions
    # that I-PPO's target uses in the iteration (influence.n_val of them, the same seeded draw) to every
    # mini-batch's loss. 0 = off. Works with or without influence (PPO + SFT, I-PPO + SFT).
    sft_coef: float = 0.0


@dataclass
class EvalConfig:
    every: int = 0  # iterations between evaluations (0 = never; also run at the end when > 0)
    num_prompts: int = 0  # 0 = the whole test split
    k: int = 8  # samples per prompt for mean accuracy, maj@k, pass@k (0: greedy accuracy only)
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 512
    batch_prompts: int = 16
    # "module:function(responses: list[str], rows: list[Example]) -> dict[str, float]", called on the greedy
    # responses of each evaluation; its metrics land in eval.jsonl (e.g. faithfulness rates). "" = none.
    response_metrics: str = ""


@dataclass
class LogConfig:
    tensorboard: bool = True  # used when installed
    wandb: bool = False
    wandb_project: str = "ippo"
    progress: bool = True
    influence_log: bool = True


@dataclass
class DistConfig:
    # several processes (torchrun): ddp = whole models on every rank, gradients summed by one all-reduce;
    # fsdp = FSDP2 (fully_shard) shards policy, critic, reference and optimizer state over the ranks
    strategy: str = "ddp"  # ddp | fsdp (one process: nothing to shard, runs unsharded)
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward
    fsdp_param_dtype: str = ""  # "" = compute in model.dtype; bfloat16 = bf16 compute over model.dtype shards


@dataclass
class CheckpointConfig:
    every: int = 1  # iterations between checkpoints (0 = only at the end)
    # checkpoints kept on disk; resume falls back to an older one when the latest does not verify (1: no fall-back)
    keep_last: int = 2
    # every K-th checkpoint (iteration divisible by K) is never pruned, e.g. to keep theta_old of the iterations
    # `ippo inspect` should explain (0 = off); only checkpoints that `every` writes can be kept
    keep_every: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    iterations: int = 100
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False
    # resume=false in a run_dir that has checkpoints is refused unless overwrite=true, which first deletes
    # the old checkpoints and logs (config_history.jsonl keeps the record)
    overwrite: bool = False
    # resume=true refuses a config that differs from the run's (config.json) in any key that changes what
    # is computed; these dotted keys or section prefixes ("ppo.lr", "rollout") may change on top of the
    # keys always allowed (ippo.rl.run_dir.ALWAYS_ALLOWED: iterations, log, eval, checkpoint, ...)
    resume_allow_changes: list[str] = field(default_factory=list)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
