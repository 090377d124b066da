# The fixed-point task `root` (README "Steps that earn their keep") on either recipe: given after the recipe's
# preset, it trains root:1-3 and reads root:1-7 (4..7 never trained), with what the 2 x 64 trunk needs to
# learn a lookup over root's 17 symbols (docs/results.md, "Sizing root"). ~60 minutes on one CPU thread.
#   python train.py config/train_steps.py config/root.py
#   python train.py config/train_levels.py config/root.py
reasoning_tasks = "root:1-3"
eval_tasks = "root:1-7"
block_size = 56        # 53-byte prompts, bos, the answer and its eot
answer_weight = 20.0   # ω: the answer ~27% of L_DS instead of ~2% (the prompt's 53 tokens are mostly noise)
n_head = 4             # 4 trunk heads of 16: with 2, step 1 never learned the 17-symbol parent lookup
n_latent = 64          # the head's attention 64 wide: at 32 the later steps never repeated step 1's lookup
beyond_chain = "stay"  # per-step random K: steps past f^3 are trained on f^3, the root (f^4 = f^3)
