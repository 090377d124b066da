# A few minutes on a laptop CPU, nothing to download: byte tokenizer, the built-in reasoning suite,
# CPython's own documentation as fluency text. nanoGPT's shakespeare_char shape (4 layers, 128 wide).
out_dir = "out-cpu"
device = "cpu"
compile = False
threads = 1  # tiny matmuls: 2 threads are ~1.6x faster on 2 idle cores, 3-5x slower if another job holds one
tokenizer = "byte"
fluency_data = "pydoc"
reasoning_data = "synthetic"
reasoning_fraction = 0.5

n_layer = 4
n_head = 4
n_embd = 128
n_steps = 4
n_latent = 64
head_attn = "none"  # position-wise: attending heads gained nothing, cost 11-16% more (README "Results")
gelu = "tanh"  # the results in results/ and docs/ were trained with it; "exact" (the default) is ~6% faster
block_size = 64
batch_size = 32
gradient_accumulation_steps = 1
dropout = 0.0

learning_rate = 4e-3  # faster than 2e-3 on add/mul and fluency (README "Data")
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
min_lr = 4e-4
beta2 = 0.99
weight_decay = 0.1

eval_interval = 250
eval_iters = 20
eval_examples = 400
log_interval = 10

# the RLRP objective: README "Results" gives the evidence for each value (ablation + sweep)
weight_schedule = "linear"
lambda_rl = 0.5
lambda_imp = 0.1
rl_answer_only = True
n_steps_dist = "uniform"  # K ~ U{1..2K-1} per step: the best and steadiest variant of the ablation
