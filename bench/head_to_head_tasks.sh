# The task side of the ES-against-GRPO head-to-head, sourced by es_vs_grpo_gpu.sh and grpo_gpu.sh after they set
# `data`. TASK picks it (default countdown) and sets three arrays of `evolm es|grpo` arguments:
#   shared     the preset and what both optimizers share: data and splits, decoding, evaluation
#   es_only    ES's own settings
#   grpo_only  GRPO's own settings (TRL's defaults otherwise; see grpo_gpu.sh)
case ${TASK:-countdown} in
  countdown)  # DATA: the paper's countdown.json. Through the chat template (the model reasons), 1,024 tokens;
              # curves on the first 200 of the 2,000 test records; all 2,000 (set `all`) scored on the base and
              # the final θ only, their completions kept in the run folder (per-example comparisons need no
              # model: a full-weight GRPO model never leaves its machine); KL to the base at every evaluation,
              # and each evaluation's 200 completions kept (per-example tests at equal training time)
    shared=(countdown task.options.chat=true "task.train=$data[:200]" "task.test=$data[-2000:]" task.test_size=200
            decoding.max_new_tokens=1024 eval.every=10 eval.kl=true "eval.sets.all=$data[-2000:]"
            "eval.final_sets=[all]" eval.keep_completions=every)
    # α from the 300-s short runs of docs/results.md (bench/short_runs_gpu.sh): 0.002 reached 23 % of the curve's
    # records in 188 s, the paper's 0.0005 7 % in 207 s; 0.004 was no better at 3.5 × the KL
    es_only=(es.prompts_per_generation=50 es.learning_rate=0.002)
    grpo_only=(grpo.prompts_per_step=16 grpo.gradient_accumulation_steps=8) ;;
  conciseness)  # DATA: the paper's conciseness folder: its 2 training and 8 test questions, 100 tokens, KL to
                # the base on the test prompts at every evaluation (the paper's Table 2 reports reward and KL)
    shared=(conciseness "task.train=$data/train.jsonl" "task.test=$data/eval.jsonl" decoding.max_new_tokens=100
            eval.every=5 eval.kl=true)
    # σ from the 320-s short runs of docs/results.md (1.5B conciseness): at the paper's σ = 0.001 the test
    # reward did not move (0.806 → 0.808, KL 0.48); at σ = 0.003, α = 0.0015 it did (→ 0.845, KL 4.6)
    es_only=(es.sigma=0.003 es.learning_rate=0.0015)
    grpo_only=(grpo.prompts_per_step=2 grpo.gradient_accumulation_steps=2) ;;
  *) echo "TASK=$TASK: countdown or conciseness" >&2; exit 2 ;;
esac
