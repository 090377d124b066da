# The depth experiment's preset (python experiments/depth.py; README "Results"): in-context lookups that need
# more hops than a 2-layer trunk can do, and the fixed-map control; reasoning batches only. The README says
# what it took (steps, task mix, model size) to get a trunk that learns one hop within the budget.
out_dir = "out-depth"
device = "cpu"
compile = False
threads = 1
tokenizer = "byte"
fluency_data = "pydoc"
reasoning_data = "synthetic"
reasoning_tasks = "hopo:1,hopo:1,hopo:2,hopo:3,iter:2"  # hopo:1 twice: half the lookups are one hop
reasoning_fraction = 1.0

n_layer = 2
n_head = 2
n_embd = 64
n_steps = 4
gelu = "tanh"  # the results in results/ and docs/ were trained with it; "exact" (the default) is ~6% faster
n_latent = 32
block_size = 48
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0

learning_rate = 4e-3
max_iters = 4000
lr_decay_iters = 4000
warmup_iters = 100
min_lr = 4e-4
beta2 = 0.99
weight_decay = 0.1

eval_interval = 500
eval_iters = 1
eval_examples = 300
log_interval = 50

weight_schedule = "linear"
lambda_rl = 0.5
lambda_imp = 0.1
rl_answer_only = True
n_steps_dist = "fixed"
