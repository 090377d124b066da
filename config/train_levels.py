# The recipe from final answers and levels only: train_steps.py's trunk, head, budget, curriculum and
# random K, with level-matched supervision instead of per-step targets. An answer of level L is trained at
# step L alone (level_steps='at'), in the iterations whose K reaches L; no "step_answers" are read, even
# where a JSONL row has them. The best final-answer arm of experiments/compose.py on hopo (README "Steps that
# earn their keep").
#   python train.py config/train_levels.py                                  # hopo:1-3, read at hopo:1-7
#   python train.py config/train_levels.py config/root.py       # the fixed-point task root (config/root.py)
#   python train.py config/train_levels.py --reasoning_data=X.jsonl --reasoning_eval_data=Y.jsonl  # "level"s
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_steps.py")).read())

out_dir = "out-levels"
step_targets = "final"   # the answer at every step it is supervised at ...
level_steps = "at"       # ... which is step L alone: an L-hop answer after L steps
beyond_chain = "stay"    # train_steps.py's 'none' acts on per-step targets only (the default again)
